"""deploy/haproxy.cfg run by the tests: the shipped file rendered for loopback
ports and an unprivileged child process, the real `haproxy` binary, and its
runtime API (the stats socket) to see which nodes it counts as up."""

from __future__ import annotations

import asyncio
import csv
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.harness import ROOT, free_port, stop_process, until, wait_port

CFG = ROOT / "deploy" / "haproxy.cfg"
BACKEND = "realtime"


def haproxy_exe() -> str:
    exe = shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if Path(p).exists()), None)
    if exe is None:
        raise RuntimeError("haproxy is not installed; run ./scripts/setup --test, which installs it")
    return exe


def _sub(pattern: str, repl: str, text: str, count: int = 0) -> str:
    """re.sub over lines that must exist: a rewrite that no longer matches
    the shipped file fails here, not as a puzzling test later."""
    new, n = re.subn(pattern, repl, text, count=count, flags=re.MULTILINE)
    assert n, f"deploy/haproxy.cfg has no line matching {pattern!r}"
    return new


def render(port: int, nodes: list[int], stats_socket: Path, sticky: bool = True,
           template: str | None = None) -> str:
    """deploy/haproxy.cfg for a test: listening on 127.0.0.1:`port`, one
    `server` line per node port (named n1, n2, ... with the shipped line's
    options), its runtime API on `stats_socket`, logging to stdout, without
    the privilege settings. `sticky=False`: the same without the cookie,
    balanced round-robin (what breaks long-polling)."""
    text = CFG.read_text() if template is None else template
    for directive in ("chroot", "user", "group", "daemon"):
        text = _sub(rf"^\s*{directive}\b.*\n", "", text)
    text = _sub(r"^\s*log /dev/log local0.*$", "    log stdout format raw local0", text)
    text = _sub(r"^\s*log /dev/log local1.*\n", "", text)
    text = _sub(r"^(\s*)stats socket \S+", rf"\g<1>stats socket {stats_socket}", text)
    text = _sub(r"^(\s*)maxconn \d+", r"\g<1>maxconn 4000", text)  # no raised file limit needed
    text = _sub(r"^(\s*)bind \S+.*$", rf"\g<1>bind 127.0.0.1:{port}", text, count=1)
    first = re.search(r"^(\s*)server (\S+) (\S+)(.*)$", text, flags=re.MULTILINE)
    assert first is not None, "deploy/haproxy.cfg has no server line"
    indent, options = first.group(1), first.group(4)
    text = _sub(r"^\s*server .*\n", "", text)
    if not sticky:
        text = _sub(r"^\s*cookie .*\n", "", text)
        text = _sub(r"^(\s*)balance \S+", r"\g<1>balance roundrobin", text)
        options = re.sub(r" cookie \S+", "", options)
    lines = []
    for i, node_port in enumerate(nodes, 1):
        node_options = re.sub(r"( cookie )\S+", rf"\g<1>n{i}", options)
        lines.append(f"{indent}server n{i} 127.0.0.1:{node_port}{node_options}\n")
    return text.rstrip("\n") + "\n" + "".join(lines)


class Haproxy:
    """`haproxy -f <rendered cfg> -db` as a child process."""

    def __init__(self, nodes: list[int], sticky: bool = True) -> None:
        self.exe = haproxy_exe()
        # Short: a Unix socket path has at most 107 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix="hap-"))
        self.port = free_port()
        self.stats_socket = self.dir / "admin.sock"
        self.cfg = self.dir / "haproxy.cfg"
        self.cfg.write_text(render(self.port, nodes, self.stats_socket, sticky))
        self.log = self.dir / "haproxy.log"
        self.names = [f"n{i}" for i in range(1, len(nodes) + 1)]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Haproxy:
        check = subprocess.run([self.exe, "-c", "-f", str(self.cfg)], capture_output=True, text=True)
        assert check.returncode == 0, f"rendered cfg refused:\n{check.stdout}{check.stderr}"
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([self.exe, "-f", str(self.cfg), "-db"],
                                         stdout=out, stderr=subprocess.STDOUT)
        wait_port(self.port, self.proc, timeout=20)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    async def command(self, line: str) -> str:
        """One command of the runtime API (the stats socket)."""
        reader, writer = await asyncio.open_unix_connection(str(self.stats_socket))
        try:
            writer.write(line.encode() + b"\n")
            await writer.drain()
            return (await asyncio.wait_for(reader.read(), 5)).decode()
        finally:
            writer.close()

    async def servers(self) -> dict[str, dict[str, str]]:
        """`show stat` of the backend's servers, by name: status (UP, DOWN,
        `UP 1/2` on its way down...), scur (connections now), stot (ever)."""
        text = await self.command("show stat")
        rows = csv.DictReader(text.lstrip("# ").splitlines())
        return {r["svname"]: r for r in rows
                if r["pxname"] == BACKEND and r["svname"] not in ("FRONTEND", "BACKEND")}

    async def status(self) -> dict[str, str]:
        return {name: row["status"] for name, row in (await self.servers()).items()}

    async def wait_status(self, want: dict[str, str], timeout: float = 15.0) -> float:
        """Wait until each named server has the wanted status; the seconds it took."""
        async def reached() -> bool:
            now = await self.status()
            return all(now.get(name) == s for name, s in want.items())

        try:
            return await until(reached, timeout, every=0.05, what=f"haproxy servers {want}")
        except TimeoutError:
            raise AssertionError(f"haproxy servers: {await self.status()}, wanted {want}\n"
                                 f"{self.log_text()[-3000:]}") from None
