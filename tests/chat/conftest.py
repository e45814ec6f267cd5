"""Fixtures of the tests in this package."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import Live, StartApp
from tests.harness import (
    server_errors,
    uid,
)


@pytest.fixture(autouse=True)
def _no_server_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """A bad payload or a store outage is answered, never logged as a crash (no record
    at ERROR, no traceback) while the test ran."""
    yield
    bad = server_errors(caplog.get_records("setup") + caplog.get_records("call"))
    assert not bad, "server logged errors:\n" + "\n".join(
        f"{r.levelname} {r.name}: {r.getMessage()} {r.exc_info[1] if r.exc_info else ''}" for r in bad)


@pytest.fixture
async def app(start_app: StartApp) -> Live:
    return await start_app(mongo_db=uid("chat_"))
