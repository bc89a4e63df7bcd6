"""The cache fingerprint: everything that changes the activations, so that a stale cache is never reused.

About the model it records the name, revision and config, plus what pins the rest of it:

- a hub model: the commit its revision resolved to (weights, processor and chat template come with it);
- a local folder: a sha256 of each weight file, kept in ``$SAHS_CACHE/weight-hashes.json`` (default
  ``~/.cache/sahs``) under the file's size, mtime, ctime and inode, so 14 GB of weights are hashed once,
  and a sha256 of each processor and tokenizer file (chat template included);
- the embedded tiny model: its seed, and its processor's files as saved;
- the dtype, the attention implementation and the transformers major.minor version.

Batch size, shard size, devices and the lock timeout do not change the rows, so they are left out.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import datasets
import transformers

from sahs.data import cache as cache_io
from sahs.data.shards import sha256_file, write_file
from sahs.extract.models import ModelConfig, hub_call, load_config, local_folder, package_version
from sahs.prompts.schema import prompt_set_hash

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# Files that shape the model's input: tokenizer, processors, chat templates.
PROCESSOR_PATTERNS = ("tokenizer*", "vocab*", "merges*", "special_tokens_map*", "added_tokens*",
                      "*processor_config*", "chat_template*", "additional_chat_templates/*",
                      "*.model", "*.tiktoken", "spiece*", "sentencepiece*")


def hash_store() -> Path:
    root = os.environ.get("SAHS_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "sahs") / "weight-hashes.json"


def weight_hashes(folder: Path) -> dict[str, str]:
    """sha256 of each weight file in ``folder``; a file whose size and times did not change is not re-read."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name in WEIGHT_INDEXES))
    store = hash_store()
    try:
        known = json.loads(store.read_text())
    except (OSError, ValueError):
        known = {}
    hashes, changed = {}, False
    for path in files:
        st = path.stat()
        key, stamp = str(path.resolve()), [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        entry = known.get(key)
        if not (isinstance(entry, dict) and entry.get("stamp") == stamp):
            entry, changed = {"stamp": stamp, "sha256": sha256_file(path)}, True
            known[key] = entry
        hashes[path.name] = entry["sha256"]
    if changed:
        try:  # a read-only home only costs a re-hash next time
            store.parent.mkdir(parents=True, exist_ok=True)
            write_file(store, json.dumps(known, indent=1, sort_keys=True).encode())
        except OSError:
            pass
    return hashes


def processor_hashes(folder: Path) -> dict[str, str]:
    """sha256 of each tokenizer, processor and chat-template file in ``folder``."""
    files = {p for pattern in PROCESSOR_PATTERNS for p in folder.glob(pattern) if p.is_file()}
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(files)}


def _tiny_processor_hashes() -> dict[str, str]:
    from sahs.extract.tiny import tiny_llava_config, tiny_llava_processor

    with tempfile.TemporaryDirectory() as folder:
        tiny_llava_processor(tiny_llava_config()).save_pretrained(folder)
        return processor_hashes(Path(folder))


def hub_commit(cfg: ModelConfig) -> str | None:
    """The commit that the model's revision resolves to (from the local hub cache when offline)."""
    from transformers.utils.hub import cached_file, extract_commit_hash

    path = hub_call(cfg, lambda: cached_file(cfg.name, "config.json", revision=cfg.revision))
    return extract_commit_hash(path, None)


def model_identity(cfg: ModelConfig) -> dict[str, Any]:
    """What the cache fingerprint records about the model (see the module docstring)."""
    config_json = json.dumps(load_config(cfg).to_dict(), sort_keys=True, default=str)
    identity: dict[str, Any] = {
        "name": cfg.name, "revision": cfg.revision, "dtype": cfg.dtype,
        "attn_implementation": cfg.attn_implementation,
        "transformers": ".".join(transformers.__version__.split(".")[:2]),
        "config_sha256": hashlib.sha256(config_json.encode()).hexdigest(),
    }
    if cfg.is_tiny:
        identity.update(seed=cfg.seed, processor=_tiny_processor_hashes())
    elif (folder := local_folder(cfg)) is not None:
        identity.update(weights=weight_hashes(folder), processor=processor_hashes(folder))
    else:
        identity["commit"] = hub_commit(cfg)
    if (version := package_version(cfg.name)) is not None:
        identity["package_version"] = version
    return identity


def expected_fingerprint(model: ModelConfig, prompts: datasets.Dataset, settings: Any) -> dict[str, Any]:
    """Everything that changes the cache's content (``settings``: the ``ExtractionSettings``)."""
    return {
        "format_version": cache_io.FORMAT_VERSION,
        "model": model_identity(model),
        "prompts": {"sha256": prompt_set_hash(prompts), "count": len(prompts)},
        "extraction": {"hook": "o_proj_input", "position": "last_prompt_token",
                       "layers": sorted(set(settings.layers)) if settings.layers is not None else None,
                       "cache_dtype": settings.cache_dtype},
    }
