"""Run every ``benchmarks/bench_*.py`` in turn, each in its own process (``make bench``).

    .venv/bin/python benchmarks/run_all.py                 # each script at its default size
    .venv/bin/python benchmarks/run_all.py --quick         # --quick passed to every script
    .venv/bin/python benchmarks/run_all.py --only training # bench_training.py alone

Each script starts (or joins) its own Ray and prints its own ratio tables; a separate process per
script keeps one benchmark's Ray and threads from skewing the next. Ends with each script's exit
status and wall time. Never part of the test suite.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import print_machine  # noqa: E402


def scripts(only: list[str] | None) -> list[Path]:
    """The benchmark scripts, in name order, optionally only those named ``bench_<name>.py``."""
    found = sorted(HERE.glob("bench_*.py"))
    if only:
        wanted = {f"bench_{name.removeprefix('bench_').removesuffix('.py')}.py" for name in only}
        missing = wanted - {p.name for p in found}
        if missing:
            names = ", ".join(p.stem.removeprefix("bench_") for p in found)
            raise SystemExit(f"--only: no {', '.join(sorted(missing))} in {HERE}; choose {names}")
        found = [p for p in found if p.name in wanted]
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick to every script")
    parser.add_argument("--only", nargs="+", help="names such as 'training' or 'inference'")
    args = parser.parse_args()
    print_machine()
    outcomes = []
    for script in scripts(args.only):
        cmd = [sys.executable, str(script), *(["--quick"] if args.quick else [])]
        print(f"\n=== {script.name} {'--quick' if args.quick else ''}".rstrip(), flush=True)
        started = time.perf_counter()
        code = subprocess.call(cmd)
        outcomes.append((script.name, code, time.perf_counter() - started))
    print("\nscript                  exit  wall")
    for name, code, seconds in outcomes:
        print(f"{name:<24}{code:>4}  {seconds:5.0f} s")
    return max((code for _, code, _ in outcomes), default=0)


if __name__ == "__main__":
    sys.exit(main())
