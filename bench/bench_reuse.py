"""What reusing a finished cache costs: `sahs loao` with the extraction callback against the same run without it.

    OMP_NUM_THREADS=1 python bench/bench_reuse.py [--rows 2000] [--rounds 3] [--workdir DIR] [--render]

The shipped demo config (`configs/demo.yaml`) with `rows` prompts (half benign, half malicious) fills a cache
once (`sahs extract`, a few minutes the first time; kept in `--workdir` for later calls). Then each round runs
`sahs loao` twice in fresh processes, in alternating order: with the config as shipped (the callback states
the prompt source's identity, finds the cache made for it and reuses it) and with the callback removed (the
run reads the cache and nothing else). It prints the medians of wall and CPU time (user + system: steadier on
a shared machine) and of peak resident memory (the kernel's high-water mark of each process, from ``wait4``)
and their ratios; the target is 1.2x or less for both. ``--render`` also measures what the callback cost
before: rendering and hashing the whole prompt set in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SAHS = [sys.executable, "-c", "import sys; from sahs.cli import main; main(sys.argv[1:])"]
RENDER = """
import sys
from sahs.prompts import DemoPrompts
from sahs.prompts.identity import PromptSet
PromptSet(DemoPrompts(**{args})).field
"""


def configs(workdir: Path, rows: int) -> tuple[Path, Path, dict]:
    """The demo config with ``rows`` prompts, with and without the extraction callback; and its prompt args."""
    config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    callbacks = config["trainer"]["callbacks"]
    prompts = callbacks[0]["init_args"]["prompts"]["init_args"]
    prompts.update(n_benign=rows // 2, n_malicious=rows - rows // 2)
    # The cache folder is named by the rows only: a cache of another prompt-code version is re-extracted.
    config["data"]["cache_dir"] = str(workdir / f"cache-{rows}")
    config["trainer"]["default_root_dir"] = str(workdir / "runs")
    with_callback, without = workdir / "with-callback.yaml", workdir / "without-callback.yaml"
    with_callback.write_text(yaml.safe_dump(config, sort_keys=False))
    config["trainer"]["callbacks"] = [c for c in callbacks if not c["class_path"].endswith("ActivationExtraction")]
    without.write_text(yaml.safe_dump(config, sort_keys=False))
    return with_callback, without, prompts


def measured(command: list[str]) -> tuple[float, float, float, str]:
    """Run ``command``: (wall seconds, CPU seconds, peak resident MiB of the process and its children, output)."""
    with tempfile.TemporaryFile("w+") as out:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command[3:])} failed ({process.returncode}):\n{text[-3000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, text


def auroc_mean(output: str) -> str:
    line = next((line for line in output.splitlines() if "loao/auroc_mean=" in line), "")
    return line.split("loao/auroc_mean=")[1].split()[0] if line else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000, help="prompts in the demo set")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each mode (medians are reported)")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "sahs-bench-reuse"),
                        help="folder for the configs, the cache (kept between calls) and the run folders")
    parser.add_argument("--render", action="store_true", help="also time rendering and hashing the prompt set")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with_callback, without, prompts = configs(workdir, args.rows)

    wall, _, _, output = measured([*SAHS, "extract", "--config", str(with_callback)])
    if "rendered to check this cache" in output:  # made by another version of the prompt code: extract anew
        shutil.rmtree(workdir / f"cache-{args.rows}")
        wall, _, _, output = measured([*SAHS, "extract", "--config", str(with_callback)])
    status = next((line for line in output.splitlines() if "activation cache" in line), "?")
    print(f"cache of {args.rows} prompts: {status.strip()} in {wall:.1f} s")
    if args.render:
        wall, cpu, peak, _ = measured([sys.executable, "-c", RENDER.format(args=json.dumps(prompts))])
        print(f"rendering and hashing the prompt set (what every run paid before): {wall:.1f} s wall, "
              f"{cpu:.1f} s CPU, {peak:.0f} MiB peak")

    results: dict[str, list[tuple[float, float, float]]] = {"with callback": [], "without callback": []}
    aurocs: dict[str, set[str]] = {name: set() for name in results}
    for round_ in range(args.rounds):
        order = [("with callback", with_callback), ("without callback", without)]
        for name, config in order if round_ % 2 == 0 else order[::-1]:
            wall, cpu, peak, output = measured([*SAHS, "loao", "--config", str(config)])
            if name == "with callback" and ("activation cache reused" not in output
                                            or "rendered to check" in output):
                raise SystemExit("the run with the callback did not reuse the cache:\n" + output[-3000:])
            results[name].append((wall, cpu, peak))
            aurocs[name].add(auroc_mean(output))
            print(f"  round {round_ + 1} {name:<17} {wall:6.1f} s wall  {cpu:6.1f} s CPU  {peak:5.0f} MiB peak  "
                  f"auroc_mean {auroc_mean(output)}")
    medians = {name: [statistics.median(run[i] for run in runs) for i in range(3)] for name, runs in results.items()}
    for name, (wall, cpu, peak) in medians.items():
        print(f"{name:<17} median {wall:6.1f} s wall  {cpu:6.1f} s CPU  {peak:5.0f} MiB peak")
    (wall_w, cpu_w, peak_w), (wall_o, cpu_o, peak_o) = medians["with callback"], medians["without callback"]
    print(f"ratio with / without the callback: time {wall_w / wall_o:.2f}x wall ({cpu_w / cpu_o:.2f}x CPU), "
          f"peak RSS {peak_w / peak_o:.2f}x (target <= 1.2x each)")
    if aurocs["with callback"] != aurocs["without callback"]:
        raise SystemExit(f"the two modes disagree on loao/auroc_mean: {aurocs}")


if __name__ == "__main__":
    main()
