"""`sahs fit` on a LLaVA-7B-shaped cache against the full-batch fit of the same detector on the same rows.

    OMP_NUM_THREADS=1 python bench/bench_fit.py [--prompts 10000] [--top-k 32] [--cache DIR]

A 7B-shaped cache (32 layers x 32 heads x 128, float16; synthetic features with twelve graded signal
heads, as in ``bench_training.py`` but along the same directions in every slice) is written once to
``--cache`` (a temporary folder by default; 2.6 GB for 10,000 prompts). On one CPU thread it then times, side by side:

- ``sahs fit`` through the real command (``configs/demo.yaml``'s ``model:`` and callbacks, without the
  extraction: ``top_k`` heads ranked on the training split, warm start, SGD epochs, EarlyStopping on
  ``val/auroc``, then validate and test of the best checkpoint); the ranking is computed by a first,
  untimed run and reused by the timed one, as by every later run on a cache;
- its parts: reading the selected heads (``ActivationDataModule.setup``), the Lightning fit loop
  (``Trainer.fit``: warm start plus minibatch epochs);
- ``LogisticDetector.fit`` alone on the same standardized training rows (what leave-one-attack-out runs).

Process CPU time is printed beside wall time (steadier on a shared machine), with the AUROC of both.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_training import FAMILIES, HEAD_DIM, HEADS, LAYERS, write_seven_b_cache  # noqa: E402

SIGNAL_SEED = 1234  # one set of signal directions for every slice of the cache


def seven_b_slice(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``[n, 32, 32, 128]`` float16 noise, labels and families; twelve heads shifted along fixed directions."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=generator)
    features = torch.randn(n, LAYERS, HEADS, HEAD_DIM, generator=generator).half()
    attacks = [FAMILIES[i] for i in torch.randint(0, len(FAMILIES), (n,), generator=generator).tolist()]
    directions = torch.randn(12, HEAD_DIM, generator=torch.Generator().manual_seed(SIGNAL_SEED))
    for rank, direction in enumerate(directions):
        layer, head = 4 + 2 * rank, (7 * rank) % HEADS
        shift = (0.9 - 0.05 * rank) * labels[:, None] * direction / direction.norm()
        features[:, layer, head] += shift.half()
    return features, labels, attacks


def timed(work):
    """``(cpu_seconds, wall_seconds, result)`` of one call."""
    cpu, wall = time.process_time(), time.perf_counter()
    result = work()
    return time.process_time() - cpu, time.perf_counter() - wall, result


def write_cache(root: Path, n: int) -> None:
    """``n`` prompts of 7B-shaped float16 activations, in slices (never the whole cache in memory)."""
    if not (root / "manifest.json").exists():
        write_seven_b_cache(root, n, seven_b_slice, shard_size=512)


def run_config(cache: Path, out: Path, top_k: int, features: int) -> Path:
    """configs/demo.yaml's model, checkpoint and early stopping, on ``cache``; lr by the configs' 0.25 / features."""
    demo = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    callbacks = [c for c in demo["trainer"]["callbacks"] if "ActivationExtraction" not in c["class_path"]]
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": demo["trainer"]["max_epochs"],
                    "default_root_dir": str(out), "logger": False, "callbacks": callbacks,
                    "enable_progress_bar": False, "enable_model_summary": False},
        "model": {**demo["model"], "lr": 0.25 / features},
        "data": {"cache_dir": str(cache), "top_k": top_k, "batch_size": 128, "seed": 0},
    }
    path = out / "bench_fit.yaml"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def bench(cache: Path, top_k: int) -> dict[str, float]:
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from sklearn.metrics import roc_auc_score

    from sahs.cli import main as sahs
    from sahs.data.datamodule import ActivationDataModule
    from sahs.models.detectors import LogisticDetector
    from sahs.models.module import DetectorModule

    features = top_k * HEAD_DIM
    with tempfile.TemporaryDirectory() as folder:
        config = run_config(cache, Path(folder), top_k, features)
        with contextlib.redirect_stdout(io.StringIO()):
            sahs(["fit", "--config", str(config), "--run.name=warm-up"])  # ranks the heads once, kept by the cache
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            cli_cpu, cli_wall, _ = timed(lambda: sahs(["fit", "--config", str(config), "--run.name=timed"]))
    summary = next(line for line in printed.getvalue().splitlines() if "test/auroc=" in line)
    figures = dict(cell.split("=") for cell in summary.removeprefix("[sahs] ").split())

    datamodule = ActivationDataModule(str(cache), top_k=top_k, batch_size=128, seed=0)
    read_cpu, read_wall, _ = timed(lambda: datamodule.setup("fit"))
    L.seed_everything(0)
    module = DetectorModule(LogisticDetector(l2=1e-3), lr=0.25 / features)
    with tempfile.TemporaryDirectory() as folder:
        trainer = L.Trainer(accelerator="cpu", max_epochs=20, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=folder,
                            callbacks=[ModelCheckpoint(monitor="val/auroc", mode="max"),
                                       EarlyStopping("val/auroc", mode="max", patience=5)])
        loop_cpu, loop_wall, _ = timed(lambda: trainer.fit(module, datamodule=datamodule))
        epochs = trainer.current_epoch

    x, y = datamodule.split_tensors("train")
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    fit_cpu, fit_wall, detector = timed(lambda: LogisticDetector(l2=1e-3).fit((x - mean) / std, y))
    full = {}
    for split in ("val", "test"):
        xs, ys = datamodule.split_tensors(split)
        full[split] = roc_auc_score(ys.numpy(), detector.decision_function((xs - mean) / std).numpy())

    n_train = len(y)
    print(f"7B-shaped cache: {len(datamodule.labels)} prompts, top_k {top_k} = {features} features, "
          f"{n_train} training rows, one thread")
    print(f"  sahs fit (command, ranking reused)     {cli_cpu:7.2f} s CPU {cli_wall:7.2f} s wall   "
          f"best_epoch {figures.get('best_epoch')}, val AUROC {float(figures['val/auroc']):.4f}, "
          f"test AUROC {float(figures['test/auroc']):.4f}")
    print(f"    read the {top_k} heads (DataModule)     {read_cpu:7.2f} s CPU {read_wall:7.2f} s wall")
    print(f"    Lightning fit loop ({epochs} epochs)     {loop_cpu:7.2f} s CPU {loop_wall:7.2f} s wall   "
          f"(warm start included)")
    print(f"  LogisticDetector.fit, same rows        {fit_cpu:7.2f} s CPU {fit_wall:7.2f} s wall   "
          f"{detector.n_iter_} iterations, val AUROC {full['val']:.4f}, test AUROC {full['test']:.4f}")
    print(f"  ratio: sahs fit / full-batch fit {cli_cpu / fit_cpu:.1f}x CPU; fit loop / full-batch fit "
          f"{loop_cpu / fit_cpu:.1f}x CPU")
    return {"sahs_fit_cpu_s": cli_cpu, "sahs_fit_wall_s": cli_wall, "read_cpu_s": read_cpu, "fit_loop_cpu_s": loop_cpu,
            "full_batch_cpu_s": fit_cpu, "val_auroc_fit": float(figures["val/auroc"]),
            "test_auroc_fit": float(figures["test/auroc"]), "val_auroc_full": full["val"],
            "test_auroc_full": full["test"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=10_000, help="prompts in the 7B-shaped cache")
    parser.add_argument("--top-k", type=int, default=32, help="heads the detector reads")
    parser.add_argument("--cache", type=Path, default=None, help="keep the cache here (reused when present)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        cache = args.cache or Path(folder) / "cache"
        write_cpu, write_wall, _ = timed(lambda: write_cache(cache, args.prompts))
        print(f"cache written in {write_wall:.0f} s wall ({write_cpu:.0f} s CPU)")
        figures = bench(cache, args.top_k)
    print(json.dumps({name: round(value, 4) for name, value in figures.items()}))


if __name__ == "__main__":
    main()
