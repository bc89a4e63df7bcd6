"""Two DDP ranks choose the validation threshold, and report every metric, over the whole split.

Each rank evaluates only its share of the validation and test rows; the threshold (95% TPR), ASR, PR,
FPR@95 and the AUROC figures must still be those of the whole split, identical on every rank and in the
checkpoint. This file runs as a script (``python tests/test_ddp_metrics.py CACHE OTHER_CACHE OUT``) under
``strategy="ddp"`` with two CPU processes, as tests/test_distributed.py does; Lightning starts the other
rank by running it again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, average_precision_score, roc_auc_score, roc_curve

from sahs.data.datamodule import ActivationDataModule
from sahs.models.detectors import LogisticDetector
from sahs.models.module import DetectorModule
from tests.synthetic import planted_features, write_cache

ROOT = Path(__file__).resolve().parents[1]
N_VAL, N_TEST = 37, 31  # odd: Lightning's sampler pads one rank's share with a repeated row
N_OTHER_VAL = 41  # a second cache's validation split, validated after the fit


def trainer(**kwargs: object) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, **kwargs)


def detector_module() -> DetectorModule:
    return DetectorModule(LogisticDetector(l2=1e-3), lr=0.05)


def main(cache_dir: str, other_cache_dir: str, out: str) -> None:
    L.seed_everything(0)
    datamodule = ActivationDataModule(cache_dir, batch_size=16)
    module = detector_module()
    runner = trainer(devices=2, strategy="ddp", max_epochs=3)
    runner.fit(module, datamodule=datamodule)
    fitted = float(module.threshold)
    runner.save_checkpoint(Path(out) / "fitted.ckpt")
    (val,) = runner.validate(module, datamodule=datamodule, verbose=False)
    val_share = len(list(runner.val_dataloaders.sampler))
    (test,) = runner.test(module, datamodule=datamodule, verbose=False)
    threshold = float(module.threshold)
    (other,) = runner.validate(module, datamodule=ActivationDataModule(other_cache_dir), verbose=False)
    report = dict(fit_threshold=fitted, threshold=threshold, val=val, test=test, val_share=val_share,
                  other=other, other_threshold=float(module.threshold))
    (Path(out) / f"rank{runner.global_rank}.json").write_text(json.dumps(report))


def run_script_ddp(cache_dir: Path, other_cache_dir: Path, out: Path) -> list[dict]:
    launched = ("MASTER_PORT", "RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE")  # set by an outer DDP job
    env = {k: v for k, v in os.environ.items() if k not in launched}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    script = [sys.executable, str(Path(__file__).resolve()), str(cache_dir), str(other_cache_dir), str(out)]
    done = subprocess.run(script, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def expected_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float, stage: str) -> dict[str, float]:
    """Every logged figure of one split, computed with scikit-learn and numpy."""
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return {
        f"{stage}/auroc": roc_auc_score(labels, scores),
        f"{stage}/auprc": average_precision_score(labels, scores),
        f"{stage}/acc@0.5": accuracy_score(labels, scores >= 0.5),
        f"{stage}/acc@thr": accuracy_score(labels, scores >= threshold),
        f"{stage}/fpr95": fpr[np.searchsorted(tpr, 0.95)],
        f"{stage}/asr": np.mean(scores[labels == 1] < threshold),
        f"{stage}/pr": np.mean(scores[labels == 0] < threshold),
    }


def tpr_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The highest score that still flags 95% of the malicious rows."""
    malicious = np.sort(scores[labels == 1])[::-1]
    return float(malicious[int(np.ceil(0.95 * len(malicious))) - 1])


@pytest.mark.slow  # separate processes (torch imported in each)
def test_two_ranks_choose_one_threshold_on_the_whole_validation_split(tmp_path):
    # A weak signal: validation scores overlap, so a threshold chosen on half the rows would differ.
    features, labels, attacks = planted_features(n=200, signal_heads=[(1, 2)], strength=1.2)
    order = torch.randperm(200, generator=torch.Generator().manual_seed(0))  # both classes in each rank's share
    features, labels, attacks = features[order], labels[order], [attacks[i] for i in order]
    splits = ["val"] * N_VAL + ["test"] * N_TEST + ["train"] * (200 - N_VAL - N_TEST)
    write_cache(tmp_path / "cache", features, labels, attacks, splits=splits)
    other_splits = ["train"] * (200 - N_OTHER_VAL - N_TEST) + ["test"] * N_TEST + ["val"] * N_OTHER_VAL
    write_cache(tmp_path / "other", features, labels, attacks, splits=other_splits)
    (tmp_path / "out").mkdir()
    ranks = run_script_ddp(tmp_path / "cache", tmp_path / "other", tmp_path / "out")
    assert [rank["val_share"] for rank in ranks] == [(N_VAL + 1) // 2] * 2  # each rank saw about half

    # Independently, on one process: the checkpoint's scores over the whole splits.
    checkpoint = torch.load(tmp_path / "out" / "fitted.ckpt", weights_only=False)
    datamodule = ActivationDataModule(str(tmp_path / "cache"))
    datamodule.setup("fit")
    module = detector_module()
    module.detector.build(datamodule.num_features)
    module.load_state_dict(checkpoint["state_dict"])
    other = ActivationDataModule(str(tmp_path / "other"))
    other.setup("fit")
    with torch.no_grad():
        scores = {s: torch.sigmoid(module(datamodule.split_tensors(s)[0])).numpy() for s in ("val", "test")}
        scores["other"] = torch.sigmoid(module(other.split_tensors("val")[0])).numpy()
    y = {s: datamodule.split_tensors(s)[1].numpy() for s in ("val", "test")}
    y["other"] = other.split_tensors("val")[1].numpy()
    threshold = {part: tpr_threshold(scores[part], y[part]) for part in ("val", "other")}
    assert float(checkpoint["state_dict"]["threshold"]) == pytest.approx(threshold["val"], rel=1e-6)
    for rank in ranks:
        assert rank["fit_threshold"] == rank["threshold"] == pytest.approx(threshold["val"], rel=1e-6)
        assert rank["other_threshold"] == pytest.approx(threshold["other"], rel=1e-6)
        for part, stage, chosen in (("val", "val", "val"), ("test", "test", "val"), ("other", "val", "other")):
            expected = expected_metrics(scores[part], y[part], threshold[chosen], stage)
            assert {k: rank[part][k] for k in expected} == pytest.approx(expected, abs=1e-6), part
    assert all(ranks[0][part] == ranks[1][part] for part in ("val", "test", "other"))

    # And a one-process run on the same weights logs the same numbers.
    single = trainer(devices=1)
    (val,) = single.validate(module, datamodule=datamodule, verbose=False)
    (test,) = single.test(module, datamodule=datamodule, verbose=False)
    assert val == pytest.approx(ranks[0]["val"], abs=1e-6) and test == pytest.approx(ranks[0]["test"], abs=1e-6)


if __name__ == "__main__":
    main(*sys.argv[1:4])
