"""Extraction through a Lightning Trainer: one process equals a direct capture, two DDP processes equal one.

Two CPU processes on gloo under ``strategy="ddp"``, launched as ``sahs extract`` launches them: this file
runs as a script (``python tests/test_distributed.py CACHE_DIR``) in a subprocess, and Lightning starts
the other rank by running it again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sahs.data.cache import ActivationCache, CacheMismatchError
from sahs.extract import distributed
from sahs.extract.adapters import find_adapter
from sahs.extract.distributed import extract_with_trainer
from sahs.extract.models import ModelConfig
from sahs.extract.pipeline import ExtractionSettings
from tests.test_cache import direct_capture, prompt_set

ROOT = Path(__file__).resolve().parents[1]
# Batch size 1: a prompt's activations do not depend on which prompts share its batch, so one and two
# processes agree up to float32 rounding (thread counts may differ). Shard size 5: with two ranks,
# each writes 5 + 1 rows.
SETTINGS = ExtractionSettings(batch_size=1, shard_size=5, cache_dtype="float32")
N_PROMPTS = 12


def by_id(root: Path) -> dict[str, torch.Tensor]:
    cache = ActivationCache(root)
    return dict(zip(cache.column("id"), cache.read()))


def shard_ids(root: Path) -> dict[str, list[str]]:
    return {p.stem: json.loads(p.read_text())["ids"] for p in sorted((root / "shards").glob("r*.json"))}


def assert_same_rows(left: Path, right: Path) -> None:
    """The same prompt ids, each with the same activations, whatever the row order."""
    a, b = by_id(left), by_id(right)
    assert sorted(a) == sorted(b)
    for pid, row in a.items():
        torch.testing.assert_close(b[pid], row, rtol=1e-5, atol=1e-6, msg=pid)


def run_script_ddp(cache_dir: Path) -> list[str]:
    """This file as a script under ``strategy="ddp"`` with 2 CPU processes; returns every rank's status."""
    launched = ("MASTER_PORT", "RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE")  # set by an outer DDP job
    env = {k: v for k, v in os.environ.items() if k not in launched}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(cache_dir)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # Both ranks write to one pipe: their lines can interleave, so read every status wherever it lands.
    return re.findall(r"status=(reused|built|resumed|repaired)", done.stdout)


@pytest.fixture(scope="module")
def prompts():
    return prompt_set(N_PROMPTS)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, prompts) -> Path:
    root = tmp_path_factory.mktemp("one_process")
    assert extract_with_trainer(root, ModelConfig(), prompts, SETTINGS, accelerator="cpu", devices=1,
                                progress=False) == "built"
    return root


def test_one_process_equals_a_direct_capture_and_is_reused(one_process, prompts, monkeypatch):
    cache = ActivationCache(one_process)
    assert cache.column("id") == prompts["id"]
    assert [len(ids) for ids in shard_ids(one_process).values()] == [5, 5, 2]
    expected = direct_capture(prompts)
    torch.testing.assert_close(cache.read().view_as(expected), expected, atol=1e-4, rtol=1e-4)

    monkeypatch.setattr(distributed, "load_model", lambda *a, **k: pytest.fail("model loaded for a valid cache"))
    assert extract_with_trainer(one_process, ModelConfig(), prompts, SETTINGS, accelerator="cpu", devices=1,
                                progress=False) == "reused"
    with pytest.raises(CacheMismatchError, match=r"model\.seed"):
        extract_with_trainer(one_process, ModelConfig(seed=1), prompts, SETTINGS, devices=1, progress=False)
    with pytest.raises(ValueError, match="precision"):  # the model's dtype is in the fingerprint, not the Trainer's
        extract_with_trainer(one_process, ModelConfig(), prompts, SETTINGS, precision="bf16-mixed")


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, prompts) -> Path:
    # A fresh script under strategy="ddp", not ddp_fork: forking a process whose OpenMP pool has
    # already run (earlier tests) can deadlock the children.
    root = tmp_path_factory.mktemp("two_processes")
    assert run_script_ddp(root) == ["built", "built"]
    return root


@pytest.mark.slow  # separate processes (torch imported in each)
def test_two_processes_write_the_same_cache_as_one(two_processes, one_process):
    shards = shard_ids(two_processes)
    assert {stem[:4] for stem in shards} == {"r000", "r001"}  # both ranks wrote rows
    written = [pid for ids in shards.values() for pid in ids]
    assert sorted(written) == sorted(f"p{i:02d}" for i in range(N_PROMPTS))  # each prompt once, none lost
    assert_same_rows(one_process, two_processes)


@pytest.mark.slow  # separate processes (torch imported in each)
def test_relaunched_ddp_script_resumes_when_one_rank_has_nothing_left(tmp_path, two_processes, one_process):
    """Only one prompt is missing: rank 1 runs no batch but must still meet rank 0 at the barriers."""
    tmp_path = Path(shutil.copytree(two_processes, tmp_path / "cache"))
    shards = shard_ids(tmp_path)
    kept = {stem: (tmp_path / "shards" / f"{stem}.safetensors").read_bytes() for stem in shards if stem != "r000-00001"}
    assert len(shards["r000-00001"]) == 1  # rank 0's 6 prompts: a shard of 5, then one of 1
    for path in (tmp_path / "shards").glob("r000-00001.*"):
        path.unlink()
    (tmp_path / "manifest.json").unlink()

    assert run_script_ddp(tmp_path) == ["resumed", "resumed"]
    assert shard_ids(tmp_path) == shards  # that prompt alone redone, by rank 0, in a shard of the same name
    for stem, data in kept.items():
        assert (tmp_path / "shards" / f"{stem}.safetensors").read_bytes() == data, stem
    assert_same_rows(one_process, tmp_path)


@pytest.mark.slow  # separate processes (torch imported in each)
def test_two_ranks_resuming_a_half_finished_cache_write_each_missing_row_once(tmp_path, one_process, prompts):
    """Rank r extracts the missing prompts of ``order[r::2]`` (every prompt, shortest text first): together
    each exactly once, and each rank's batches are those of the full plan (the same neighbours on any resume)."""
    root = Path(shutil.copytree(one_process, tmp_path / "cache"))
    kept = (root / "shards" / "r000-00000.safetensors").read_bytes()
    for path in [*(root / "shards").glob("r000-00001.*"), *(root / "shards").glob("r000-00002.*")]:
        path.unlink()
    (root / "manifest.json").unlink()
    done = set(shard_ids(root)["r000-00000"])
    texts = prompts["text"]
    order = sorted(range(len(texts)), key=lambda i: (len(texts[i]), i))
    assert len(done) == 5  # half-finished: 5 of 12 prompts are in the shard that is left

    assert run_script_ddp(root) == ["resumed", "resumed"]
    shards = shard_ids(root)
    for rank, stem in ((0, "r000-00001"), (1, "r001-00000")):
        assert shards[stem] == [prompts["id"][i] for i in order[rank::2] if prompts["id"][i] not in done]
    written = [pid for ids in shards.values() for pid in ids]
    assert sorted(written) == sorted(prompts["id"])  # every prompt once: none lost, none twice
    assert (root / "shards" / "r000-00000.safetensors").read_bytes() == kept
    assert_same_rows(one_process, root)


def test_kept_layers_stop_the_forward_after_the_last_one(tmp_path, prompts, monkeypatch):
    """Early exit: with ``layers=[1]`` no later layer and no LM head runs, and layer 1 is still right."""
    calls: dict[str, int] = {}
    real_load = distributed.load_model

    def counting_load(cfg):
        model, processor = real_load(cfg)
        watched = {f"o_proj{i}": m for i, m in enumerate(find_adapter(model).out_projs)}
        watched["lm_head"] = model.get_output_embeddings()
        for name, module in watched.items():
            calls[name] = 0
            module.register_forward_pre_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
        return model, processor

    monkeypatch.setattr(distributed, "load_model", counting_load)
    few = prompts.select(range(4))
    settings = ExtractionSettings(batch_size=2, layers=[1], cache_dtype="float32")
    extract_with_trainer(tmp_path, ModelConfig(), few, settings, accelerator="cpu", devices=1, progress=False)
    assert calls == {"o_proj0": 2, "o_proj1": 2, "o_proj2": 0, "o_proj3": 0, "lm_head": 0}
    cache = ActivationCache(tmp_path)
    assert cache.layers == [1]
    torch.testing.assert_close(cache.read(), direct_capture(few)[:, 1], atol=1e-4, rtol=1e-4)


def main(cache_dir: str) -> None:
    status = extract_with_trainer(cache_dir, ModelConfig(), prompt_set(N_PROMPTS), SETTINGS, accelerator="cpu",
                                  devices=2, strategy="ddp", progress=False)
    print(f"status={status}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
