"""How this process collects cyclic garbage without long pauses.

CPython's full (generation 2) collection walks every tracked object. A
server holding thousands of sockets has hundreds of thousands of them, and
GPS traffic promotes medium-lived objects (the latest position per
technician, pending writes) into generation 2 fast enough to trigger a full
collection every few seconds: pauses of 100+ ms (ANCHORS.md; measured again
in docs/benchmarks.md). So:

- at start, everything allocated so far is frozen (never scanned again);
- automatic full collections are off (generation 2's threshold is huge);
  young collections keep running as usual and stay short;
- every `freeze_s` the survivors since the last freeze are collected once
  more, then frozen too: the sockets and rooms of connected clients stop
  costing collection time. That collection covers generation 2 (the frozen
  objects are never walked) whenever it holds at most GEN2_SWEEP_MAX
  objects: cyclic garbage that lived long enough to reach generation 2
  (the exceptions and sessions of store calls that waited out a stall, say)
  is freed here, not frozen until the next full collection. After a connect
  storm, when generation 2 is mostly live sockets and walking it would
  pause too long, it is only a young collection, as before;
- every `full_s` one full collection reclaims cyclic garbage that was frozen
  meanwhile (a disconnected client's objects), logged with its pause;
- every `young_s` a young collection runs whether or not CPython's own
  trigger fired. That trigger counts allocations *minus deallocations*: a
  GPS fix allocates a technician's new position and frees the previous one
  (already old), so under steady tracking load the count hardly moves while
  the young generation fills with every technician's live position, and the
  collection that finally fires walks all of them (15–30 ms with 2,000
  technicians, measured). Collected on a clock, the young generation holds
  only what was allocated since the last tick.

Memory freed by reference counting (almost everything) is unaffected; only
garbage in reference cycles waits for the next full collection.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time

log = logging.getLogger(__name__)

NO_AUTO_FULL = 1_000_000_000
# Generation 1 is collected every third young collection (CPython: tenth): it
# holds what survived since, and a collection's pause grows with it. What
# survives it waits in generation 2 for the freeze; cyclic garbage among it,
# for the scheduled full collection.
YOUNG1 = 3


def start_policy() -> None:
    gc.collect()
    gc.freeze()
    young0, _, _ = gc.get_threshold()
    gc.set_threshold(young0, YOUNG1, NO_AUTO_FULL)


# Generation 2 (the survivors since the last freeze) is collected before the
# freeze when it holds at most this many objects: ~46 ns each to walk on the
# development machine, so about 10 ms, under the 20 ms pause target; counting
# them first costs ~14 ns each.
GEN2_SWEEP_MAX = 200_000


def freeze_survivors() -> int:
    """Collect what died since the last freeze (generation 2 too, when that
    is cheap), then freeze everything still alive; the generation collected."""
    generation = 2 if len(gc.get_objects(2)) <= GEN2_SWEEP_MAX else 1
    gc.collect(generation)
    gc.freeze()
    return generation


def full_collection() -> int:
    """Unfreeze, collect everything, freeze again; the objects freed."""
    started = time.perf_counter()
    gc.unfreeze()
    found = gc.collect()
    gc.freeze()
    log.info("full garbage collection: %d objects freed, %.0f ms",
             found, (time.perf_counter() - started) * 1000)
    return found


def young_collection() -> None:
    """Generation 0, or 0 and 1 when generation 1 is due by CPython's own rule."""
    _, due1, _ = gc.get_threshold()
    gc.collect(1 if gc.get_count()[1] >= due1 else 0)


async def run_young(young_s: float) -> None:
    while True:
        await asyncio.sleep(young_s)
        young_collection()


async def run_policy(freeze_s: float, full_s: float) -> None:
    next_full = time.monotonic() + full_s
    while True:
        await asyncio.sleep(freeze_s)
        if time.monotonic() >= next_full:
            next_full = time.monotonic() + full_s
            full_collection()
        else:
            freeze_survivors()
