"""python -m loadtest bench [--quick] [--targets ...]: the side-by-side benchmark.
python -m loadtest.quick tracking|chat: quick single-process measurements."""

from __future__ import annotations

import sys

from loadtest.bench import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if args and args[0] == "bench":
        args = args[1:]
    main(args)
