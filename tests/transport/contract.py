"""The contract tests' machinery: a hook, its check, and cheap real objects of
the libraries to check against."""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import logging
import textwrap
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "realtime" / "transport" / "README.md"
LOCK = ROOT / "requirements-test.lock"

# Libraries whose internals the transport uses; their versions must be the
# locked ones (bidict: python-socketio's rooms are bidicts, read via _fwdm).
PINNED = ("aiohttp", "python-engineio", "python-socketio", "redis", "bidict")

# Servers built here log nowhere (and add no handler to the libraries' loggers).
QUIET = logging.getLogger("tests.transport.contract")
QUIET.disabled = True

# What python-engineio may call on a socket's queue: the methods
# realtime/transport/sio.py's stand-in queue implements.
QUEUE_METHODS = frozenset({"get", "get_nowait", "put", "put_nowait", "task_done", "join",
                           "empty", "qsize"})


class ContractBroken(AssertionError):
    """A library no longer behaves as a hook of the transport expects."""


def expect(ok: object, why: str) -> None:
    if not ok:
        raise ContractBroken(why)


CheckResult = Awaitable[None] | None


@dataclass(frozen=True)
class Hook:
    name: str  # as in realtime/transport/README.md
    check: Callable[[], CheckResult]


async def failure_of(hook: Hook) -> str | None:
    """None when the hook holds, else a message that starts with its name."""
    try:
        result = hook.check()
        if result is not None:
            await result
    except Exception as exc:  # a moved module, a renamed attribute, a changed behaviour
        return (f"hook {hook.name!r} broke: {type(exc).__name__}: {exc}\n"
                f"  (realtime/transport/README.md says what it is for and what to do)")
    return None


# -- helpers -------------------------------------------------------------------
def mod(name: str) -> Any:
    """A library module, imported when a check runs. A check that subclasses
    one of its classes annotates the module `Any`: mypy reads a class
    statement's bases before it infers a local's type."""
    return importlib.import_module(name)


def resolve(target: str) -> Any:
    """'package.module:Attr.attr' -> the object."""
    module, _, path = target.partition(":")
    obj = mod(module)
    for part in path.split(".") if path else ():
        obj = getattr(obj, part)
    return obj


def params(func: Any) -> list[str]:
    """Parameter names in order, as written: '*' before keyword-only ones,
    '*args' and '**kwargs' for the variadic ones."""
    out: list[str] = []
    star = False
    for p in inspect.signature(func).parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            out.append("*" + p.name)
            star = True
        elif p.kind is p.VAR_KEYWORD:
            out.append("**" + p.name)
        else:
            if p.kind is p.KEYWORD_ONLY and not star:
                out.append("*")
                star = True
            out.append(p.name)
    return out


def signature_is(target: str, *expected: str) -> Callable[[], None]:
    """The library's `target` takes exactly these parameters (what our code calls)."""
    def check() -> None:
        got = params(resolve(target))
        expect(got == list(expected),
               f"{target} takes ({', '.join(got)}); the transport uses ({', '.join(expected)})")
    return check


def overridden_as(target: str, ours: Callable[[], Any]) -> Callable[[], None]:
    """Our override has the library method's parameters, in its order."""
    def check() -> None:
        lib, mine = params(resolve(target)), params(ours())
        expect(lib == mine,
               f"{target} now takes ({', '.join(lib)}); our override takes ({', '.join(mine)})")
    return check


def all_of(*checks: Callable[[], CheckResult]) -> Callable[[], Awaitable[None]]:
    async def check() -> None:
        for one in checks:
            result = one()
            if result is not None:
                await result
    return check


def source_of(target: str) -> str:
    return inspect.getsource(resolve(target))


def assigned_on_self(cls: type) -> set[str]:
    """Every `self.x = ...` in a class's body."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    names: set[str] = set()
    for node in ast.walk(tree):
        targets: list[ast.expr]
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, ast.AnnAssign | ast.AugAssign):
            targets = [node.target]
        else:
            continue
        while targets:
            target = targets.pop()
            if isinstance(target, ast.Tuple | ast.List):
                targets.extend(target.elts)
            elif isinstance(target, ast.Starred):
                targets.append(target.value)
            elif (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
                    and target.value.id == "self"):
                names.add(target.attr)
    return names


def no_clash(ours: Callable[[], type], lib: str, stock: Callable[[], Any],
             intended: frozenset[str]) -> Callable[[], None]:
    """What our subclass defines or sets on `self` must not be something the
    library class (or an instance of it) already has, except the hooks we
    override or set on purpose: a library that adds a name we use would be
    silently overridden."""
    def check() -> None:
        cls = ours()
        base = resolve(lib)
        expect(issubclass(cls, base), f"{cls.__name__} is no longer a {lib}")
        lib_names = set(dir(base)) | set(vars(stock()))
        mine = {n for n in vars(cls)
                if not (n.startswith("__") and n.endswith("__")) and not n.startswith("_abc_")}
        mine |= assigned_on_self(cls)
        clashes = sorted(n for n in mine if n in lib_names and n not in intended)
        expect(not clashes, f"{lib} now has {clashes}, which {cls.__name__} defines too")
    return check


def absent_on(stock: Callable[[], Any], names: tuple[str, ...], what: str) -> Callable[[], None]:
    """Attributes we add onto a library's objects must not exist there."""
    def check() -> None:
        obj = stock()
        there = sorted(n for n in names if hasattr(obj, n))
        expect(not there, f"{what} now has {there}, which the transport sets on it")
    return check


def ours(target: str) -> Callable[[], Any]:
    return lambda: resolve(target)


# -- objects built cheaply ---------------------------------------------------------
def engineio_server(**kwargs: Any) -> Any:
    engineio = mod("engineio")
    kwargs.setdefault("logger", QUIET)
    return engineio.AsyncServer(async_mode="aiohttp", **kwargs)


def socketio_server(**kwargs: Any) -> Any:
    socketio = mod("socketio")
    return socketio.AsyncServer(async_mode="aiohttp", logger=QUIET, engineio_logger=QUIET, **kwargs)


def engineio_socket(**server_kwargs: Any) -> Any:
    async_socket = mod("engineio.async_socket")
    return async_socket.AsyncSocket(engineio_server(**server_kwargs), "sid-1")


@functools.cache
def realtime_server() -> Any:
    """Ours, for the classes it installs (its engine.io server, its websocket driver)."""
    sio = mod("realtime.transport.sio")
    return sio.RealtimeServer(async_mode="aiohttp", logger=QUIET, engineio_logger=QUIET)


def redis_manager_class() -> type:
    cls: type = resolve("socketio:AsyncRedisManager")
    return cls


def redis_manager() -> Any:
    return redis_manager_class()("redis://127.0.0.1:1/0", channel="contract")
