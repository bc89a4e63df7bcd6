"""A damaged or contested cache is caught and mended by the documented commands, with nothing lost.

Damage (a flipped byte in a shard's data or header, a deleted shard, a corrupt manifest) is refused on
reuse, named by ``sahs cache verify`` and undone by ``sahs cache repair``, which re-extracts only the
rows of the bad shard; the result is compared with the untouched cache. Two extractions into one folder
are serialised by the folder's lock. Run as a script (``python tests/test_integrity.py CACHE_DIR``),
this file is one of those extractions.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from sahs.cli import main
from sahs.data import shards as shards_io
from sahs.data import cache as cache_io
from sahs.data.cache import ActivationCache, CacheDamagedError, CacheMismatchError, ShardWriter
from sahs.data.integrity import verify_cache
from sahs.data.lock import CacheBusyError, CacheLock
from sahs.extract import pipeline
from sahs.extract.distributed import extract_with_trainer
from sahs.extract.models import ModelConfig
from sahs.extract.pipeline import ExtractionSettings, ensure_cache
from tests.test_cache import prompt_set

ROOT = Path(__file__).resolve().parents[1]
N_PROMPTS = 10
EXTRACTION = {"batch_size": 1, "shard_size": 4, "cache_dtype": "float32"}  # shards of 4 + 4 + 2 rows


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def by_id(root: Path) -> dict[str, torch.Tensor]:
    cache = ActivationCache(root)
    return dict(zip(cache.column("id"), cache.read()))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    """A run config over a saved prompt set, and the cache that `sahs extract` made from it."""
    folder = tmp_path_factory.mktemp("integrity")
    prompt_set(N_PROMPTS).save_to_disk(str(folder / "prompts"))
    config = {"trainer": {"accelerator": "cpu", "devices": 1, "default_root_dir": str(folder / "run"),
                          "callbacks": [{"class_path": "sahs.callbacks.ActivationExtraction", "init_args": {
                              "prompts": {"class_path": "sahs.prompts.SavedPrompts",
                                          "init_args": {"path": str(folder / "prompts")}},
                              "extraction": EXTRACTION, "progress": False}}]},
              "data": {"cache_dir": str(folder / "cache")}}
    (folder / "run.yaml").write_text(yaml.safe_dump(config))
    main(["extract", "--config", str(folder / "run.yaml")])
    return {"config": folder / "run.yaml", "cache": folder / "cache", "folder": folder}


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def damage(root: Path, kind: str) -> str:
    """Damage the cache at ``root``; returns what the error must name."""
    shard = root / "shards" / "r000-00001.safetensors"
    if kind == "data":
        flip(shard, shard.stat().st_size - 40)  # inside the last row's values
    elif kind == "header":
        first_id = json.loads(shard.with_suffix(".json").read_text())["ids"][0]
        flip(shard, shard.read_bytes().index(first_id.encode()))  # a prompt id in the header's metadata
    elif kind == "deleted":
        shard.unlink()
    elif kind == "manifest":
        manifest = root / "manifest.json"
        manifest.write_bytes(manifest.read_bytes().replace(b'"label": 1', b'"label": 0', 1))
        return "manifest.json"
    elif kind == "labels":  # every label inverted, the manifest's checksum recomputed: it parses and checks out
        manifest = json.loads((root / "manifest.json").read_text())
        for row in manifest["rows"]:
            row["label"] = 1 - row["label"]
        manifest["checksum"] = cache_io._digest({k: v for k, v in manifest.items() if k != "checksum"})
        (root / "manifest.json").write_text(json.dumps(manifest))
        return "manifest.json"
    elif kind == "fingerprint":
        flip(root / "fingerprint.json", 20)
        return "fingerprint.json"
    elif kind == "fingerprint_missing":
        (root / "fingerprint.json").unlink()
        return "fingerprint.json"
    elif kind == "fingerprint_replaced":  # another model's, well-formed
        fingerprint = json.loads((root / "fingerprint.json").read_text())
        fingerprint["model"]["seed"] = 1
        (root / "fingerprint.json").write_bytes(cache_io.fingerprint_bytes(fingerprint))
        return "fingerprint.json"
    return shard.name


@pytest.mark.parametrize("kind", ["data", "header", "deleted", "manifest", "labels", "fingerprint",
                                  "fingerprint_missing", "fingerprint_replaced"])
def test_damage_is_refused_named_and_repaired_by_the_documented_command(tmp_path, run, kind, capsys, monkeypatch):
    root = Path(shutil.copytree(run["cache"], tmp_path / "cache"))
    named = damage(root, kind)
    untouched = {name: data for name, data in files(root).items()
                 if Path(named).stem not in name and name not in ("manifest.json", "fingerprint.json")}

    with pytest.raises(SystemExit) as verdict:
        main(["cache", "verify", str(root)])
    assert f"sahs cache repair {root}" in str(verdict.value.code)
    assert named in capsys.readouterr().out

    with pytest.raises(CacheDamagedError, match=rf"{named}.*sahs cache repair {root} --config"):
        ActivationCache(root).read()  # what `sahs fit` reads: refused, not trained on
    # `sahs extract` on it says the same in one line, and leaves it as it is.
    with pytest.raises(SystemExit):
        main(["extract", "--config", str(run["config"]), f"--data.cache_dir={root}"])
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and named in error and "sahs cache repair" in error and "Traceback" not in error

    extracted: list[str] = []
    real_add = shards_io.ShardWriter.add
    monkeypatch.setattr(shards_io.ShardWriter, "add", lambda self, ids, rows: (extracted.extend(ids),
                                                                                real_add(self, ids, rows)))
    main(["cache", "repair", str(root), "--config", str(run["config"])])
    assert "activation cache repaired" in capsys.readouterr().out
    lost = [] if kind.startswith(("manifest", "labels", "fingerprint")) else json.loads(
        (run["cache"] / "shards" / "r000-00001.json").read_text())["ids"]
    assert sorted(extracted) == sorted(lost)  # only the bad shard's rows went through the model again
    assert all(files(root).get(name) == data for name, data in untouched.items())  # the rest was kept as it was
    assert (root / "fingerprint.json").read_bytes() == (run["cache"] / "fingerprint.json").read_bytes()
    assert verify_cache(root).ok
    repaired, reference = ActivationCache(root), ActivationCache(run["cache"])
    for column in ("id", "label", "attack", "source", "category"):  # in the same order, flipped label undone
        assert repaired.column(column) == reference.column(column)
    assert torch.equal(repaired.read(), reference.read())


@pytest.mark.parametrize("kind", ["fingerprint_missing", "fingerprint_replaced"])
def test_a_cache_whose_fingerprint_is_gone_is_not_taken_for_another_models(tmp_path, run, kind):
    """Without the fingerprint the manifest recorded, the activations are no model's: another config is
    refused by a run and by a repair, and the folder is left as it was."""
    root = Path(shutil.copytree(run["cache"], tmp_path / "cache"))
    damage(root, kind)
    before = files(root)
    other, prompts, settings = ModelConfig(seed=1), prompt_set(N_PROMPTS), ExtractionSettings(**EXTRACTION)
    with pytest.raises((CacheMismatchError, CacheDamagedError), match="fingerprint.json"):
        ensure_cache(root, other, prompts, settings, progress=False)
    with pytest.raises((CacheMismatchError, CacheDamagedError), match="fingerprint.json"):
        extract_with_trainer(root, other, prompts, settings, repair=True, accelerator="cpu", devices=1,
                             progress=False)
    assert files(root) == before
    assert not verify_cache(root).ok


def test_shards_repeated_by_a_second_extraction_are_resolved_not_fatal(tmp_path, run, monkeypatch):
    """The state that two unlocked extractions left: the same prompts in shards of two ranks' names."""
    root = Path(shutil.copytree(run["cache"], tmp_path / "cache"))
    reference = by_id(run["cache"])
    sidecars = {p.stem: json.loads(p.read_text())["ids"] for p in sorted((root / "shards").glob("r*.json"))}
    for suffix in (".safetensors", ".json"):  # a whole copy of shard 0, under another rank's name
        shutil.copy(root / "shards" / f"r000-00000{suffix}", root / "shards" / f"r001-00000{suffix}")
    overlap = [sidecars["r000-00000"][0], *sidecars["r000-00002"]]  # one repeated prompt, two that are not
    for suffix in (".safetensors", ".json"):
        (root / "shards" / f"r000-00002{suffix}").unlink()
    writer = ShardWriter(root, json.loads((root / "shards" / "r000-00000.json").read_text())["layout"], rank=2,
                         dtype=torch.float32)
    writer.add(overlap, torch.stack([reference[pid] for pid in overlap]).view(len(overlap), 4, 4, -1))
    writer.close()
    (root / "manifest.json").unlink()  # where "prompt ... is in two shards" used to stop every run

    monkeypatch.setattr(pipeline, "extract_into", lambda *a, **k: pytest.fail("nothing is missing"))
    status = ensure_cache(root, ModelConfig(), prompt_set(N_PROMPTS), ExtractionSettings(**EXTRACTION), progress=False)
    assert status == "resumed"
    assert not (root / "shards" / "r001-00000.safetensors").exists()  # every row of it is in r000-00000
    assert verify_cache(root).ok
    again = by_id(root)
    assert sorted(again) == sorted(reference) and all(torch.equal(again[pid], reference[pid]) for pid in reference)


@pytest.mark.slow  # separate processes (torch imported in each)
def test_two_extractions_at_once_wait_for_the_lock_and_build_the_cache_once(tmp_path, run):
    """This process and a script extract into one folder at once; the lock lets one build, the other reuse."""
    root = tmp_path / "cache"
    lock = CacheLock(root).acquire()  # held until the script surely waits for the folder
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    log = tmp_path / "extract.log"
    other = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), str(root)], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
    for line in other.stdout:  # blocks until the line is printed: no sleeping, no polling
        if "waiting for another extraction" in line:
            assert f"pid {os.getpid()}" in line  # it names who holds the folder
            break
    else:
        pytest.fail(f"no waiting message:\n{log.read_text()[-3000:]}")
    lock.release()
    mine = ensure_cache(root, ModelConfig(), prompt_set(N_PROMPTS), ExtractionSettings(**EXTRACTION), progress=False)
    out, _ = other.communicate(timeout=300)
    assert other.returncode == 0, log.read_text()[-3000:]
    theirs = [line.split("=", 1)[1] for line in out.splitlines() if line.startswith("status=")]
    assert sorted([mine, *theirs]) == ["built", "reused"]  # whichever got the folder first built it
    ids = [pid for p in (root / "shards").glob("r*.json") for pid in json.loads(p.read_text())["ids"]]
    assert sorted(ids) == sorted(prompt_set(N_PROMPTS)["id"])  # each prompt in exactly one shard
    assert verify_cache(root).ok
    reference, built = by_id(run["cache"]), by_id(root)
    assert all(torch.allclose(built[pid], reference[pid], atol=1e-5, rtol=1e-5) for pid in reference)


def test_a_busy_folder_is_refused_naming_the_holder(tmp_path):
    root = tmp_path / "cache"
    settings = ExtractionSettings(**EXTRACTION, lock_timeout=0)
    with CacheLock(root):
        with pytest.raises(CacheBusyError, match=rf"in use by another extraction \(pid {os.getpid()} on "):
            ensure_cache(root, ModelConfig(), prompt_set(3), settings, progress=False)
        with pytest.raises(CacheBusyError, match="after waiting 0.2 s"):
            ensure_cache(root, ModelConfig(), prompt_set(3), ExtractionSettings(**EXTRACTION, lock_timeout=0.2),
                         progress=False)
    assert ensure_cache(root, ModelConfig(), prompt_set(3), settings, progress=False) == "built"


def test_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        ensure_cache(tmp_path / "cache", ModelConfig(), prompt_set(5), ExtractionSettings(**EXTRACTION), progress=False)
    finally:
        os.umask(old)
    modes = {str(p.relative_to(tmp_path)): p.stat().st_mode & 0o777 for p in tmp_path.rglob("*")}
    assert len(modes) == 9  # the folder, its lock, fingerprint, manifest, shards folder, two shards, two sidecars
    assert modes == {name: 0o750 if (tmp_path / name).is_dir() else 0o640 for name in modes}


def test_checksums_are_computed_once_per_process_unless_a_file_changes(tmp_path, run, monkeypatch):
    root = Path(shutil.copytree(run["cache"], tmp_path / "cache"))
    hashed: list[str] = []
    real = shards_io.sha256_file
    monkeypatch.setattr(shards_io, "sha256_file", lambda path, *a: (hashed.append(path.name), real(path, *a))[1])
    shards_io.forget_verified()
    ActivationCache(root).read()
    assert sorted(hashed) == sorted(p.name for p in (root / "shards").glob("*.safetensors"))  # each once
    ActivationCache(root).read([(0, 1)])
    assert len(hashed) == 3  # a second read in this process trusts what it verified
    shard = root / "shards" / "r000-00002.safetensors"
    stat = shard.stat()
    flip(shard, stat.st_size - 8)
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and mtime: the ctime still moved
    with pytest.raises(CacheDamagedError, match="r000-00002.safetensors does not match its checksum"):
        ActivationCache(root).read()
    assert hashed[3:] == ["r000-00002.safetensors"]


def script(cache_dir: str) -> None:
    prompts = prompt_set(N_PROMPTS)
    status = extract_with_trainer(cache_dir, ModelConfig(), prompts, ExtractionSettings(**EXTRACTION),
                                  accelerator="cpu", devices=1, progress=False)
    print(f"status={status}", flush=True)


if __name__ == "__main__":
    script(sys.argv[1])
