"""The embedded MongoDB-protocol server: SecantusDB run as a child process.

A separate process keeps its GPL licence on the far side of a socket and its
work off our event loop. Data lives in ``<data_dir>/mongo`` and survives
restarts; the child is stopped (SIGTERM, then SIGKILL) with the server.

The data is stored chats, orders and trails: the data dir, the store's files
and its log are the owner's only (dirs 0700, files 0600). The child runs
with umask 077, and what an older version left readable is tightened at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
from pathlib import Path

log = logging.getLogger(__name__)

# WiredTiger recovery on a large data dir can take a while on first start.
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
# Whatever the store creates: no access for group or others.
STORE_UMASK = 0o077


def make_private(root: Path, recursive: bool = True) -> None:
    """chmod `root` (and, recursive, everything under it) to its owner only:
    dirs 0700, files without group/other bits. Symlinks are left alone (their
    targets are not ours to change); a path we cannot change is logged, not
    fatal."""
    if not root.exists():
        return
    paths = [root]
    if recursive and root.is_dir():
        for dirpath, dirnames, filenames in os.walk(root):  # symlinked dirs are not entered
            paths.extend(Path(dirpath) / name for name in dirnames + filenames)
    for path in paths:
        try:
            if path.is_symlink():
                continue
            mode = path.stat().st_mode
            private = 0o700 if path.is_dir() else (mode & 0o700)
            if (mode & 0o777) != private:
                path.chmod(private)
        except OSError as exc:
            log.warning("could not make %s private: %s", path, exc.strerror)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def find_executable(name: str) -> str:
    """The launcher installed beside our interpreter first (a venv), then PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(
            f"{name!r} not found: install the project (pip install -e .) or set MONGO_URL"
        )
    return found


async def _wait_port(host: str, port: int, proc: asyncio.subprocess.Process,
                     timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if proc.returncode is not None:
            raise RuntimeError(f"embedded store exited with code {proc.returncode} at start")
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return
    raise RuntimeError(f"embedded store did not listen on {host}:{port} within {timeout:.0f}s")


class EmbeddedMongo:
    def __init__(self, storage_path: Path | str, command: str = "secantusd-py",
                 host: str = "127.0.0.1", port: int | None = None) -> None:
        self.storage_path = storage_path
        self.command = command
        self.host = host
        self.port = port or free_port(host)
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"mongodb://{self.host}:{self.port}/?directConnection=true"

    async def start(self) -> None:
        log_path: Path | None = None
        if self.storage_path != ":memory:":
            store_dir = Path(self.storage_path)
            store_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            log_path = store_dir.parent / "secantusd.log"
            # The data dir itself, not what else it holds; all of the store's own.
            make_private(store_dir.parent, recursive=False)
            make_private(store_dir)
            make_private(log_path)
        exe = find_executable(self.command)
        out: int = (os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                    if log_path else asyncio.subprocess.DEVNULL)
        # The child inherits our umask at fork. (Popen's umask= is not in
        # uvloop's subprocess_exec; preexec_fn is unsafe with threads.) The
        # fork happens before create_subprocess_exec first yields, and a file
        # another thread creates meanwhile is only made more private.
        umask = os.umask(STORE_UMASK)
        try:
            # Through a supervisor that stops the store if we die (even by
            # SIGKILL): a store left behind would hold the data dir's lock.
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "storage.embedded_shim",
                exe, "--host", self.host, "--port", str(self.port),
                "--storage-path", str(self.storage_path), "--log-level", "WARNING",
                stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
                # Its own process group: a Ctrl-C in the terminal reaches us,
                # and we stop it in order, after our last write.
                start_new_session=True,
            )
        finally:
            os.umask(umask)
            if log_path:
                os.close(out)
        log.info("embedded store (SecantusDB) starting on %s:%d, data in %s (pid %d)",
                 self.host, self.port, self.storage_path, self._proc.pid)
        try:
            await _wait_port(self.host, self.port, self._proc, START_TIMEOUT_S)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            log.warning("embedded store did not stop in %.0fs; killing it", STOP_TIMEOUT_S)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        log.info("embedded store stopped")
