"""Resume after a hard kill: no prompt lost, none written twice, the same cache as an uninterrupted run.

Run as a script (``python tests/test_resume.py CACHE_DIR``) it extracts with a model slowed down by a
sleeping hook, so that the test can SIGKILL it between two shards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sahs.data import cache as cache_io
from sahs.data.cache import ActivationCache
from sahs.extract import distributed
from sahs.extract.distributed import extract_with_trainer
from sahs.extract.models import ModelConfig
from sahs.extract.pipeline import ExtractionSettings
from tests.test_cache import prompt_set

ROOT = Path(__file__).resolve().parents[1]
N_PROMPTS = 16
SETTINGS = ExtractionSettings(batch_size=1, shard_size=3, cache_dtype="float32")  # 6 shards: 5 x 3 + 1
SECONDS_PER_BATCH = 0.25  # the script's slowdown: >= 2 s between the second shard and the end


def finished(root: Path) -> dict[str, list[str]]:
    """Shards with a sidecar (written last, so these were whole when the process died)."""
    if not (root / "shards").is_dir():
        return {}
    return {p.stem: json.loads(p.read_text())["ids"] for p in sorted((root / "shards").glob("r*.json"))}


def start_slow_extraction(root: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), str(root)], cwd=ROOT, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def kill_after_shards(process: subprocess.Popen, root: Path, log: Path, count: int) -> None:
    deadline = time.monotonic() + 120
    while len(finished(root)) < count:
        assert process.poll() is None, f"the extraction ended before it could be killed:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "no shard was finished within 120 s"
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def prompts():
    return prompt_set(N_PROMPTS)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, prompts) -> Path:
    root = tmp_path_factory.mktemp("uninterrupted")
    extract_with_trainer(root, ModelConfig(), prompts, SETTINGS, accelerator="cpu", devices=1, progress=False)
    return root


def test_killed_extraction_resumes_from_its_last_finished_shard(tmp_path, prompts, uninterrupted, monkeypatch):
    root = tmp_path / "cache"
    process = start_slow_extraction(root, tmp_path / "extract.log")
    kill_after_shards(process, root, tmp_path / "extract.log", count=2)
    assert process.returncode == -signal.SIGKILL
    assert not (root / "manifest.json").exists()
    at_kill = finished(root)
    assert 2 <= len(at_kill) < 6, at_kill  # killed between two shards, before the end

    # Also truncate a finished shard on disk: its checksum no longer matches, so its prompts are redone.
    corrupt = sorted(at_kill)[0]
    shard = root / "shards" / f"{corrupt}.safetensors"
    shard.write_bytes(shard.read_bytes()[:-9])
    kept = {stem: (root / "shards" / f"{stem}.safetensors").read_bytes() for stem in at_kill if stem != corrupt}
    kept_ids = {pid for stem in kept for pid in at_kill[stem]}

    extracted: list[str] = []
    real_add = cache_io.ShardWriter.add
    monkeypatch.setattr(cache_io.ShardWriter, "add",
                        lambda self, ids, acts: (extracted.extend(ids), real_add(self, ids, acts)))
    status = extract_with_trainer(root, ModelConfig(), prompts, SETTINGS, accelerator="cpu", devices=1,
                                  progress=False)
    assert status == "resumed"
    # Exactly the prompts outside the intact shards, each once: nothing lost, nothing redone twice.
    assert sorted(extracted) == sorted(pid for pid in prompts["id"] if pid not in kept_ids)
    assert len(set(extracted)) == len(extracted)
    on_disk = [pid for ids in finished(root).values() for pid in ids]
    assert sorted(on_disk) == sorted(prompts["id"])  # every prompt in exactly one shard
    for stem, data in kept.items():
        assert (root / "shards" / f"{stem}.safetensors").read_bytes() == data, f"{stem} was rewritten"
    assert not list((root / "shards").glob(".*.tmp"))

    cache, reference = ActivationCache(root), ActivationCache(uninterrupted)
    assert cache.column("id") == reference.column("id") == prompts["id"]
    # Batch size 1: a prompt's row does not depend on its neighbours, so the caches agree to rounding.
    torch.testing.assert_close(cache.read(), reference.read(), rtol=1e-5, atol=1e-6)


def _slow_load_model(cfg: ModelConfig):
    model, processor = _real_load_model(cfg)
    model.register_forward_pre_hook(lambda *_: time.sleep(SECONDS_PER_BATCH))
    return model, processor


_real_load_model = distributed.load_model

if __name__ == "__main__":
    distributed.load_model = _slow_load_model
    extract_with_trainer(sys.argv[1], ModelConfig(), prompt_set(N_PROMPTS), SETTINGS, accelerator="cpu", devices=1,
                         progress=False)
