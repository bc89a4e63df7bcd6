"""Kill an extraction at a named point, resume it: nothing lost, nothing written twice, the same bytes.

Run as a script (``python tests/test_resume.py CACHE_DIR``) it extracts the prompt set below; the test
sets ``SAHS_KILL_AT`` so that the script SIGKILLs itself at a chosen point (halfway through a shard, after
the last shard but before the manifest, halfway through the manifest). No sleeps, no polling: the kill
lands at the same byte every time. The resume runs with ``lock_timeout=0``, so the lock that the killed
process held must have died with it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sahs.data import cache as cache_io
from sahs.data.cache import ActivationCache
from sahs.extract.distributed import extract_with_trainer
from sahs.extract.models import ModelConfig
from sahs.extract.pipeline import ExtractionSettings
from tests.test_cache import prompt_set

ROOT = Path(__file__).resolve().parents[1]
N_PROMPTS = 10
# Batch size 1: a row does not depend on its neighbours. 4 shards: 3 + 3 + 3 + 1. lock_timeout 0: a lock
# left by the killed process would make the resume fail at once instead of hanging.
SETTINGS = ExtractionSettings(batch_size=1, shard_size=3, cache_dtype="float32", lock_timeout=0)


def finished(root: Path) -> dict[str, list[str]]:
    """Shards with a sidecar (written last, so these were whole when the process died)."""
    if not (root / "shards").is_dir():
        return {}
    return {p.stem: json.loads(p.read_text())["ids"] for p in sorted((root / "shards").glob("r*.json"))}


def files(root: Path) -> dict[str, bytes]:
    """Every file of a cache folder but the lock, by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def killed_extraction(root: Path, point: str, log: Path, batch_size: int = 1) -> None:
    """Run this file as a script with ``SAHS_KILL_AT=point``; it must die by SIGKILL there."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(torch.get_num_threads()),
           "SAHS_KILL_AT": point}
    with log.open("w") as out:
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(root), str(batch_size)], cwd=ROOT,
                              env=env,
                              stdout=out, stderr=subprocess.STDOUT, timeout=300)
    assert done.returncode == -signal.SIGKILL, f"not killed at {point}:\n{log.read_text()[-3000:]}"


def resume(root: Path, prompts, monkeypatch, settings: ExtractionSettings = SETTINGS) -> tuple[str, list[str]]:
    """Extract again in this process; returns the status and the ids that went through the model."""
    extracted: list[str] = []
    real_add = cache_io.ShardWriter.add
    monkeypatch.setattr(cache_io.ShardWriter, "add",
                        lambda self, ids, acts: (extracted.extend(ids), real_add(self, ids, acts)))
    status = extract_with_trainer(root, ModelConfig(), prompts, settings, accelerator="cpu", devices=1,
                                  progress=False)
    return status, extracted


@pytest.fixture(scope="module")
def prompts():
    return prompt_set(N_PROMPTS)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, prompts) -> Path:
    root = tmp_path_factory.mktemp("uninterrupted")
    extract_with_trainer(root, ModelConfig(), prompts, SETTINGS, accelerator="cpu", devices=1, progress=False)
    return root


@pytest.fixture(scope="module")
def killed_mid_shard(tmp_path_factory) -> Path:
    """Killed halfway through writing its third shard: two finished shards and a half-written one."""
    root = tmp_path_factory.mktemp("killed") / "cache"
    killed_extraction(root, "shard_write:3", root.parent / "extract.log")
    return root


def copy_or_kill(point: str, killed_mid_shard: Path, tmp_path: Path) -> Path:
    root = tmp_path / "cache"
    if point == "shard_write:3":
        return Path(shutil.copytree(killed_mid_shard, root))
    killed_extraction(root, point, tmp_path / "extract.log")
    return root


@pytest.mark.parametrize("point", ["shard_write:3", "before_manifest", "manifest_write"])
def test_a_kill_at_any_point_resumes_to_the_bytes_of_an_uninterrupted_run(tmp_path, prompts, uninterrupted,
                                                                          killed_mid_shard, monkeypatch, point):
    root = copy_or_kill(point, killed_mid_shard, tmp_path)
    at_kill = finished(root)
    assert not (root / "manifest.json").exists()
    if point == "shard_write:3":  # two whole shards, and the third one's temporary file cut in the middle
        assert sorted(at_kill) == ["r000-00000", "r000-00001"]
        tmp = next((root / "shards").glob(".r000-00002.safetensors.*.tmp"))
        assert 0 < tmp.stat().st_size < (uninterrupted / "shards" / "r000-00002.safetensors").stat().st_size
    else:  # every shard whole; the manifest not begun, or its temporary file cut in the middle
        assert len(at_kill) == 4
        assert len(list(root.glob(".manifest.json.*.tmp"))) == (point == "manifest_write")

    status, extracted = resume(root, prompts, monkeypatch)
    assert status == "resumed"
    done_before = {pid for ids in at_kill.values() for pid in ids}
    assert sorted(extracted) == sorted(pid for pid in prompts["id"] if pid not in done_before)  # only those, once
    assert not list(root.rglob("*.tmp"))
    # The same files, byte for byte: shards, sidecars, fingerprint and manifest.
    assert files(root) == files(uninterrupted)


def test_a_killed_extraction_redoes_only_unfinished_and_corrupt_shards(tmp_path, prompts, uninterrupted,
                                                                       killed_mid_shard, monkeypatch):
    root = Path(shutil.copytree(killed_mid_shard, tmp_path / "cache"))
    at_kill = finished(root)
    # Also truncate a finished shard on disk: its checksum no longer matches, so its prompts are redone.
    shard = root / "shards" / "r000-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-9])
    kept = (root / "shards" / "r000-00001.safetensors").read_bytes()

    status, extracted = resume(root, prompts, monkeypatch)
    assert status == "resumed"
    # Exactly the prompts outside the intact shard, each once: nothing lost, nothing redone twice.
    assert sorted(extracted) == sorted(pid for pid in prompts["id"] if pid not in at_kill["r000-00001"])
    on_disk = [pid for ids in finished(root).values() for pid in ids]
    assert sorted(on_disk) == sorted(prompts["id"])  # every prompt in exactly one shard
    assert (root / "shards" / "r000-00001.safetensors").read_bytes() == kept, "an intact shard was rewritten"

    cache, reference = ActivationCache(root), ActivationCache(uninterrupted)
    assert cache.column("id") == reference.column("id") == prompts["id"]
    # Batch size 1: a prompt's row does not depend on which shard or batch it went into.
    assert torch.equal(cache.read(), reference.read())


@pytest.mark.parametrize("batch_size", [2, 4])
def test_a_resume_batches_as_the_uninterrupted_run_when_shards_split_batches(tmp_path, prompts, monkeypatch,
                                                                            batch_size):
    """Shards of 3 prompts, batches of 2 or 4: a batch never spans two shards, so the prompts left after a kill
    go through the model with the same neighbours (the same padding) as in one run, to the same bytes."""
    settings = dataclasses.replace(SETTINGS, batch_size=batch_size)
    whole = tmp_path / "whole"
    extract_with_trainer(whole, ModelConfig(), prompts, settings, accelerator="cpu", devices=1, progress=False)
    root = tmp_path / "cache"
    killed_extraction(root, "shard_written:1", tmp_path / "extract.log", batch_size)
    assert sorted(finished(root)) == ["r000-00000"]
    status, extracted = resume(root, prompts, monkeypatch, settings)
    assert status == "resumed" and len(extracted) == N_PROMPTS - 3
    assert files(root) == files(whole)


if __name__ == "__main__":
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else SETTINGS.batch_size
    extract_with_trainer(sys.argv[1], ModelConfig(), prompt_set(N_PROMPTS), dataclasses.replace(SETTINGS, batch_size=batch),
                         accelerator="cpu", devices=1, progress=False)
