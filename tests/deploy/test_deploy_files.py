"""deploy/: what the systemd unit and the container run is what `python -m
realtime --help` offers, every setting they name exists, their stop timeouts
cover the drain, and HAProxy accepts deploy/haproxy.cfg with timeouts above
Engine.IO's ping interval + ping timeout. (The container is not built here:
no container runtime.)"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from pydantic import AliasChoices

from realtime.__main__ import SHUTDOWN_TIMEOUT_S
from realtime.settings import Settings
from tests.deploy.haproxy import CFG, haproxy_exe
from tests.harness import ROOT
from tests.server_procs import clean_env, cli

DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "realtime@.service"
ENV_FILE = DEPLOY / "realtime.env"
CONTAINERFILE = DEPLOY / "Containerfile"
DRAIN_S = float(Settings.model_fields["drain_s"].default)
PING_S = (float(Settings.model_fields["ping_interval_s"].default)
          + float(Settings.model_fields["ping_timeout_s"].default))


def setting_names() -> set[str]:
    """Every environment variable the server reads (REALTIME_<field>, and aliases)."""
    names = set()
    for name, field in Settings.model_fields.items():
        names.add(f"REALTIME_{name.upper()}")
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(str(choice) for choice in alias.choices)
        elif isinstance(alias, str):
            names.add(alias)
    return names


def unit_entries(text: str) -> dict[str, list[str]]:
    """`Key=value` lines of a unit file, by `Section.Key` (keys may repeat)."""
    entries: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return entries


def seconds(value: str, default_unit: str = "s") -> float:
    """A duration as systemd ("30", "30s", "1min") or HAProxy ("500ms", "1h"; bare: ms) write it."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s|sec|m|min|h)?", value.strip())
    assert m, f"not a duration: {value!r}"
    unit = m.group(2) or default_unit
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}[unit]


_HELP: dict[tuple[str, ...], str] = {}


async def help_of(*command: str) -> str:
    """`python -m realtime <command> --help` (each asked once per run)."""
    if command not in _HELP:
        code, out, err = await cli(*command, "--help", env=clean_env(), cwd=ROOT)
        assert code == 0, err
        _HELP[command] = out
    return _HELP[command]


async def check_command(argv: list[str], where: str) -> None:
    """`argv` runs the server: a Python, `-m realtime`, then (optionally) the
    `serve` subcommand and options that its --help lists."""
    assert len(argv) >= 3 and Path(argv[0]).name.startswith("python"), f"{where}: {argv}"
    assert argv[1:3] == ["-m", "realtime"], f"{where} runs {argv[1:3]}, not `-m realtime`"
    rest = argv[3:]
    top = await help_of()
    m = re.search(r"\{([\w,-]+)\}", top)
    assert m, top
    subcommands = m.group(1).split(",")
    text = top
    if rest and not rest[0].startswith("-"):
        assert rest[0] in subcommands, f"{where}: {rest[0]!r} is not one of {subcommands}"
        assert rest[0] == "serve", f"{where} runs `{rest[0]}`, not the server"
        text = await help_of(rest[0])
        rest = rest[1:]
    for arg in rest:
        assert arg.startswith("-"), f"{where}: `serve` takes no argument {arg!r}"
        option = arg.split("=", 1)[0]
        assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text), \
            f"{where}: {option} is not an option of python -m realtime ({text})"


async def test_unit_runs_the_server() -> None:
    entries = unit_entries(UNIT.read_text())
    [exec_start] = entries["Service.ExecStart"]
    await check_command(shlex.split(exec_start), UNIT.name)

    env = dict(e.split("=", 1) for e in entries.get("Service.Environment", []))
    assert set(env) <= setting_names(), set(env) - setting_names()
    assert env["REALTIME_PORT"] == "%i", "the instance is the port"
    assert entries["Service.EnvironmentFile"]
    # The server gets SIGTERM (it drains, then stops), its children are its own.
    assert entries["Service.KillSignal"] == ["SIGTERM"]
    assert entries["Service.KillMode"] == ["mixed"]
    [stop_timeout] = entries["Service.TimeoutStopSec"]
    assert seconds(stop_timeout) > DRAIN_S + SHUTDOWN_TIMEOUT_S + 5, stop_timeout
    assert entries["Service.Restart"] == ["on-failure"]
    assert int(entries["Service.LimitNOFILE"][0]) >= 65536
    assert entries["Service.User"] != ["root"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_passes_systemd_analyze(tmp_path: Path) -> None:
    """systemd's own check: keys, values, the command's executable. The unit
    is checked as installed, with this checkout in place of /opt/realtime."""
    text = UNIT.read_text()
    for installed, here in [("/opt/realtime/.venv/bin/python", sys.executable),
                            ("/opt/realtime", str(ROOT)),
                            ("/etc/realtime/realtime.env", str(ENV_FILE))]:
        assert installed in text, installed
        text = text.replace(installed, here)
    instance = tmp_path / "realtime@8081.service"
    instance.write_text(text)
    done = subprocess.run(["systemd-analyze", "verify", str(instance)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), done.stdout + done.stderr


def test_env_file_is_a_valid_configuration() -> None:
    names = re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", ENV_FILE.read_text(), flags=re.MULTILINE)
    assert names and set(names) <= setting_names(), set(names) - setting_names()
    assert "REALTIME_PORT" not in names, "the unit's instance sets the port; the file would override it"
    settings = Settings(_env_file=str(ENV_FILE))  # type: ignore[call-arg]
    assert settings.redis_url and settings.mongo_url, "N nodes share one Redis and one MongoDB"
    assert settings.trusted_proxies, "behind HAProxy"
    assert settings.drain_s == DRAIN_S


def containerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of the final stage, continuation lines joined."""
    text = re.sub(r"\\\n", " ", CONTAINERFILE.read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    steps = [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last_from:]


async def test_container_runs_the_server() -> None:
    steps = containerfile()
    args = {op: [a for o, a in steps if o == op] for op, _ in steps}
    assert args["FROM"][0].startswith("python:3.11-slim")
    [cmd] = args["CMD"]
    await check_command(json.loads(cmd), "Containerfile CMD")

    env: dict[str, str] = {}
    for line in args["ENV"]:
        env.update(dict(pair.split("=", 1) for pair in shlex.split(line)))
    settings = {k: v for k, v in env.items() if k.startswith("REALTIME_")}
    assert set(settings) <= setting_names(), set(settings) - setting_names()
    assert args["EXPOSE"] == [settings["REALTIME_PORT"]]
    assert settings["REALTIME_HOST"] == "0.0.0.0"
    assert args["USER"] and args["USER"] != ["root"]
    assert any("--require-hashes" in run and "requirements.lock" in run for run in args["RUN"])
    assert "/healthz" in args["HEALTHCHECK"][0]
    assert args.get("STOPSIGNAL", ["SIGTERM"]) == ["SIGTERM"]

    # Every package of the server is in the image (the load generator is not the server).
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = {p.rstrip("*") for p in find["include"]} - {"loadtest"}
    copied = {a.split()[0] for a in args["COPY"] if not a.startswith("--")}
    assert packages <= copied, f"not copied into the image: {packages - copied}"
    assert "web" in copied and any(a.startswith("--from=web") for a in args["COPY"])


def test_haproxy_accepts_the_shipped_cfg() -> None:
    done = subprocess.run([haproxy_exe(), "-c", "-f", str(CFG)], capture_output=True, text=True,
                          timeout=30)
    out = done.stdout + done.stderr
    assert done.returncode == 0 and "WARNING" not in out and "ALERT" not in out, out


def test_haproxy_timeouts_outlast_engineio_pings() -> None:
    """Long-polls and websockets idle for up to ping interval + ping timeout
    (25 s + 20 s) are healthy: HAProxy must not cut them sooner."""
    timeouts = dict(re.findall(r"^\s*timeout (\S+) (\S+)", CFG.read_text(), flags=re.MULTILINE))
    for name in ("client", "server", "tunnel"):
        assert seconds(timeouts[name], "ms") > PING_S, (name, timeouts[name])
    # The check waits longer than /readyz's own bound on its store ping (2 s).
    assert seconds(timeouts["check"], "ms") > 2
    text = CFG.read_text()
    assert re.search(r"^\s*option forwardfor\b", text, flags=re.MULTILINE)
    assert re.search(r"^\s*http-check send meth GET uri /readyz\s*$", text, flags=re.MULTILINE)
