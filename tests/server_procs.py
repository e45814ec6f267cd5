"""Helpers for tests that run `python -m realtime` as a real child process with
the embedded store: a clean environment, async start/stop, and checks that no
process is left behind holding a data dir."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

from tests.harness import ServerProcess

# Settings the parent environment must not leak into a server under test: a
# MONGO_URL/REDIS_URL would bypass the embedded store, a stray REALTIME_* would
# change what is being tested.
_LEAKY = ("MONGO_URL", "REDIS_URL")
START_TIMEOUT = 90.0
STOP_TIMEOUT = 30.0


def server_process(env: dict[str, str]) -> ServerProcess:
    """A ServerProcess whose environment is os.environ minus any store URL and
    any REALTIME_* setting, plus `env` (and the harness's port and host). No
    drain on SIGTERM unless `env` asks for one: no load balancer watches these
    servers, and tests stop many."""
    env = {"REALTIME_DRAIN_S": "0", **env}
    server = ServerProcess(env)
    keep = {*env, "REALTIME_PORT", "REALTIME_HOST"}
    for key in list(server.env):
        if key in _LEAKY or (key.startswith("REALTIME_") and key not in keep):
            del server.env[key]
    return server


def clean_env(**env: str) -> dict[str, str]:
    """os.environ without store URLs or REALTIME_* settings, plus `env` (for the CLI)."""
    base = {k: v for k, v in os.environ.items()
            if k not in _LEAKY and not k.startswith("REALTIME_")}
    return {**base, **env}


async def start(server: ServerProcess) -> ServerProcess:
    """Start (blocking: waits for /readyz, bounded by the harness) off the event loop."""
    return await asyncio.wait_for(asyncio.to_thread(server.start), START_TIMEOUT)


async def stop(server: ServerProcess, sig: int = signal.SIGTERM) -> int:
    """Stop with `sig` (the harness waits 15 s, then SIGKILLs) and return the exit code."""
    await asyncio.wait_for(asyncio.to_thread(server.stop, sig), STOP_TIMEOUT)
    assert server.proc is not None and server.proc.returncode is not None
    return server.proc.returncode


def log_text(server: ServerProcess) -> str:
    return server.log.read_text(errors="replace") if server.log.exists() else ""


def embedded_store_pid(server: ServerProcess) -> int:
    """The pid of the SecantusDB child, as the server logs it at start."""
    pids = re.findall(r"embedded store \(SecantusDB\) starting on .* \(pid (\d+)\)", log_text(server))
    assert pids, f"the server did not log an embedded store start:\n{log_text(server)[-3000:]}"
    return int(pids[-1])


def alive(pid: int) -> bool:
    """True while `pid` is a live process (a zombie holds nothing and counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def processes_using(path: Path) -> list[str]:
    """Other processes whose command line, working directory or open files are under `path`."""
    root = str(path.resolve())

    def under(p: str) -> bool:
        return p == root or p.startswith(root + "/")

    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            links = [os.readlink(entry / "cwd")]
            fds = list((entry / "fd").iterdir())
        except (FileNotFoundError, ProcessLookupError, PermissionError, NotADirectoryError):
            continue
        for fd in fds:
            try:
                links.append(os.readlink(fd))
            except OSError:
                continue
        if root in cmdline or any(under(link) for link in links):
            found.append(f"pid {entry.name}: {cmdline.strip()}")
    return found


async def wait_gone(pid: int, timeout: float) -> None:
    """Wait, at most `timeout` seconds, until `pid` (not necessarily our child)
    has terminated: a pidfd becomes readable when its process exits."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not exited.done():
            exited.set_result(None)

    try:
        loop.add_reader(fd, readable)
        try:
            await asyncio.wait_for(exited, timeout)
        except TimeoutError:
            pass  # still there: the caller's check says so
        finally:
            loop.remove_reader(fd)
    finally:
        os.close(fd)


# How long a CLI command (`token`, a `serve` that should refuse to start) may take.
CLI_TIMEOUT = 30.0


async def cli(*args: str, env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    """`python -m realtime <args>`: its exit code, stdout and stderr (killed
    after CLI_TIMEOUT, e.g. a server that should have refused to start)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "realtime", *args, env=env, cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
