"""tests/interop/orders_client.mjs (the official JavaScript socket.io-client) as
an asyncio child process whose stdout is read one JSON line at a time."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.harness import ROOT

INTEROP_DIR = ROOT / "tests" / "interop"
SCRIPT = INTEROP_DIR / "orders_client.mjs"
LINE_TIMEOUT = 15.0
EXIT_TIMEOUT = 10.0
SETUP_HINT = "run scripts/setup --test (it runs `npm ci` in tests/interop)"


def require_node() -> str:
    """The node executable, or a test failure (never a skip) saying how to get it."""
    node = shutil.which("node")
    if node is None:
        pytest.fail(f"node is not installed: {SETUP_HINT}", pytrace=False)
    if not (INTEROP_DIR / "node_modules" / "socket.io-client" / "package.json").is_file():
        pytest.fail(f"{INTEROP_DIR / 'node_modules'} has no socket.io-client: {SETUP_HINT}",
                    pytrace=False)
    return node


class NodeOrdersClient:
    """One run of orders_client.mjs. The token goes in the environment (RT_TOKEN),
    not on the command line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[dict[str, Any]] = []
        self.stderr = ""

    @classmethod
    async def start(cls, url: str, token: str, order_id: str, *, transport: str, count: int = 1,
                    since_seq: int | None = None, timeout_ms: int = 15_000) -> NodeOrdersClient:
        node = require_node()
        args = [str(SCRIPT), url, "--transport", transport, "--count", str(count),
                "--timeout-ms", str(timeout_ms)]
        if since_seq is not None:
            args += ["--since-seq", str(since_seq)]
        env = {"PATH": str(Path(node).parent), "RT_TOKEN": token, "RT_ORDER_ID": order_id}
        proc = await asyncio.create_subprocess_exec(
            node, *args, cwd=INTEROP_DIR, env=env,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        return cls(proc)

    async def _stderr(self) -> str:
        assert self.proc.stderr is not None
        if self.proc.returncode is None:
            return "(still running)"
        with contextlib.suppress(TimeoutError):
            return (await asyncio.wait_for(self.proc.stderr.read(), 2.0)).decode(errors="replace")
        return "(unreadable)"

    async def next_line(self, timeout: float = LINE_TIMEOUT) -> dict[str, Any]:
        assert self.proc.stdout is not None
        try:
            raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except TimeoutError:
            raise AssertionError(f"node client printed nothing in {timeout}s; so far: {self.lines}") from None
        if not raw:
            await asyncio.wait_for(self.proc.wait(), EXIT_TIMEOUT)
            raise AssertionError(
                f"node client exited ({self.proc.returncode}) after {self.lines}; "
                f"stderr: {await self._stderr()}")
        line = json.loads(raw)
        self.lines.append(line)
        return dict(line)

    async def expect(self, kind: str, timeout: float = LINE_TIMEOUT) -> dict[str, Any]:
        """The next line; it must be of type `kind`. The `notifications` a
        customer or technician missed, pushed on connecting to /orders, are
        passed over unless an event is what is expected."""
        line = await self.next_line(timeout)
        while kind != "event" and line.get("type") == "event" and line.get("name") == "notifications":
            line = await self.next_line(timeout)
        assert line["type"] == kind, f"expected a {kind!r} line, got {line}; before it: {self.lines[:-1]}"
        return line

    async def exit_code(self, timeout: float = EXIT_TIMEOUT) -> int:
        """Wait for the process to end (bounded) and check it printed nothing more
        on stdout; its stderr is then in ``self.stderr``."""
        assert self.proc.stdout is not None and self.proc.stderr is not None
        rest = await asyncio.wait_for(self.proc.stdout.read(), timeout)
        assert rest == b"", f"unexpected output after the last expected line: {rest!r}"
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        self.stderr = (await asyncio.wait_for(self.proc.stderr.read(), timeout)).decode(errors="replace")
        return code

    async def close(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
