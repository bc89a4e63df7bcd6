"""Hashes of a model's files, for the cache fingerprint: its weights and what shapes its input.

Weight files are hashed once: each file's sha256 is kept in ``$SAHS_CACHE/weight-hashes.json`` (default
``~/.cache/sahs``) under its size, mtime, ctime and inode, and read from there while those are unchanged,
so 14 GB of weights cost one pass. Tokenizer, processor and chat-template files are small and hashed
every time.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from sahs.data.shards import sha256_file, write_file

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


def tiny_processor_hashes() -> dict[str, str]:
    """The embedded tiny model's processor files, as ``save_pretrained`` writes them."""
    from sahs.extract.tiny import tiny_llava_config, tiny_llava_processor

    with tempfile.TemporaryDirectory() as folder:
        tiny_llava_processor(tiny_llava_config()).save_pretrained(folder)
        return processor_hashes(Path(folder))
