"""A small supervisor between the server and the embedded store.

    python -m storage.embedded_shim <store command...>

The kernel tells this process when the server dies (PR_SET_PDEATHSIG, even
on SIGKILL); it then stops the store the way the server would have: SIGTERM,
a grace period for the store to checkpoint, then SIGKILL. Putting it in
between means a store that ignores or stalls on SIGTERM can never outlive
the server and hold the data directory's lock.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from types import FrameType

GRACE_S = 10.0
POLL_S = 0.1


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:  # not glibc Linux: the server's own stop() is all there is
        pass


def main() -> None:
    parent = os.getppid()
    _die_with_parent()
    store = subprocess.Popen(sys.argv[1:])
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True  # acted on by the loop below, never inside the handler

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    deadline: float | None = None
    while True:
        rc = store.poll()
        if rc is not None:
            sys.exit(0 if stopping else rc)
        if os.getppid() != parent:  # the server is gone (also if the prctl came too late)
            stopping = True
        if stopping and deadline is None:
            store.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + GRACE_S
        elif deadline is not None and time.monotonic() > deadline:
            store.kill()
        time.sleep(POLL_S)


if __name__ == "__main__":
    main()
