"""Start-up cost of the ``sahs`` command: ``sahs --help`` against the bare interpreter and a Lightning verb's imports.

    OMP_NUM_THREADS=1 python bench/bench_startup.py [--rounds 5]     # about a minute on 2 cores

Each figure is the median wall time of fresh processes (the interpreter's import caches warm). ``sahs
--help`` and an unknown verb import neither torch nor Lightning; a Lightning verb pays for them.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

CASES = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "sahs --help": [sys.executable, "-m", "sahs", "--help"],
    "sahs fti (unknown verb)": [sys.executable, "-m", "sahs", "fti"],
    "import sahs.cli (a Lightning verb's imports)": [sys.executable, "-c", "import sahs.cli"],
}


def wall(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    rounds = parser.parse_args().rounds
    for command in CASES.values():  # warm the file system and byte-code caches
        wall(command)
    times = {name: statistics.median(wall(command) for _ in range(rounds)) for name, command in CASES.items()}
    base = times["python -c pass"]
    for name, seconds in times.items():
        print(f"{name:<46} {seconds:7.3f} s   {seconds / base:6.1f}x the bare interpreter")
    heavy = times["import sahs.cli (a Lightning verb's imports)"]
    print(f"sahs --help costs {times['sahs --help'] / heavy:.3f} of a Lightning verb's imports")


if __name__ == "__main__":
    main()
