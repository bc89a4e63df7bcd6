"""What cache integrity costs: checksums on reuse against plain sha256, cheap checks, writes, the lock.

A cache of a 7B-shaped model (32 layers x 32 heads x 128, float16: 256 KiB a prompt) is written through
``ShardWriter``; then, each time with this process's memory of verified files cleared:

- plain ``hashlib.sha256`` over the same shard files, one thread (the reference figure);
- ``ActivationCache.verify()``: every shard's sha256, on several threads (what the first reuse costs);
- opening the cache (the cheap checks: sizes and headers of every shard, manifest checksum);
- the first and second read of 8 heads, with and without checksums (the lazy per-shard check);
- writing: ``ShardWriter`` (bytes hashed as they are written) against ``safetensors.save_file`` alone;
- the folder lock: uncontended acquire + release.

The shards were just written, so they are in the page cache: the figures are the CPU cost of the
checks, and a cold read is bounded by the disk instead (a cold first read pays the disk once either way).

    OMP_NUM_THREADS=1 python bench/bench_integrity.py [--rows 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from sahs.data import shards as shards_io
from sahs.data.cache import ActivationCache, ShardWriter, write_manifest
from sahs.data.lock import CacheLock

LAYERS, HEADS, HEAD_DIM = 32, 32, 128  # a 7B LLaVA's language model


def timed(call, rounds: int) -> tuple[float, float]:
    """Median wall and process-CPU seconds of ``call()`` over ``rounds`` runs (CPU time sums the threads
    and is the steadier figure on a shared machine)."""
    wall, cpu = [], []
    for _ in range(rounds):
        start, start_cpu = time.perf_counter(), time.process_time()
        call()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def write_cache(root: Path, rows: int, shard_size: int, batch: int = 16) -> None:
    layout = {"num_layers": LAYERS, "num_heads": HEADS, "head_dim": HEAD_DIM, "layers": list(range(LAYERS)),
              "family": "llava"}
    block = torch.randn(batch, LAYERS, HEADS, HEAD_DIM)  # [batch, layers, heads, head_dim]
    writer = ShardWriter(root, layout, shard_size=shard_size)
    for first in range(0, rows, batch):
        count = min(batch, rows - first)
        writer.add([f"r{i:06d}" for i in range(first, first + count)], block[:count])
    writer.close()
    write_manifest(root, ({"id": f"r{i:06d}", "label": i % 2} for i in range(rows)))


def plain_writes(root: Path, rows: int, shard_size: int, read_back: bool, batch: int = 16) -> None:
    """The same rows as whole shards through ``save_file`` alone; ``read_back`` adds a sha256 of each file
    read back from disk (how shards were checksummed before: after the write, not from its bytes)."""
    block = torch.randn(batch, LAYERS, HEADS, HEAD_DIM)
    for index, first in enumerate(range(0, rows, shard_size)):
        count = min(shard_size, rows - first)
        stacked = torch.stack([block[i % batch].half() for i in range(count)])
        path = root / f"{index}.safetensors"
        save_file({"activations": stacked}, str(path))
        if read_back:
            plain_sha256([path])


def plain_sha256(paths: list[Path]) -> None:
    for path in paths:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000, help="prompts in the cache (2000: about 0.5 GB)")
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    heads = [(layer, head) for layer in range(0, LAYERS, 4) for head in (0,)]  # 8 heads
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        root = Path(tmp) / "cache"
        written = timed(lambda: write_cache(root, args.rows, args.shard_size), 1)
        paths = sorted((root / "shards").glob("*.safetensors"))
        mb = sum(p.stat().st_size for p in paths) / 1e6
        (Path(tmp) / "plain").mkdir()
        plain_writes(Path(tmp) / "plain", args.shard_size, args.shard_size, True)  # warm-up: first-touch costs
        save_only = timed(lambda: plain_writes(Path(tmp) / "plain", args.rows, args.shard_size, False), 1)
        save_and_hash = timed(lambda: plain_writes(Path(tmp) / "plain", args.rows, args.shard_size, True), 1)

        sha, sha_cpu = timed(lambda: plain_sha256(paths), args.rounds)

        def full_verify() -> None:
            shards_io.forget_verified()
            ActivationCache(root).verify()

        verify, verify_cpu = timed(full_verify, args.rounds)
        cheap, _ = timed(lambda: ActivationCache(root, checksums=False), args.rounds)

        def first_read(checksums: bool) -> None:
            shards_io.forget_verified()
            ActivationCache(root, checksums=checksums).read(heads)

        read_checked, _ = timed(lambda: first_read(True), args.rounds)
        read_plain, _ = timed(lambda: first_read(False), args.rounds)
        cache = ActivationCache(root)
        cache.read(heads)
        read_again, _ = timed(lambda: cache.read(heads), args.rounds)
        lock = CacheLock(root)
        lock_cost = timed(lambda: [lock.acquire().release() for _ in range(1000)], args.rounds)[0] / 1000

    print(f"cache: {args.rows} rows of [{LAYERS}, {HEADS}, {HEAD_DIM}] float16 in {len(paths)} shards, {mb:.0f} MB "
          f"(page cache warm; {args.rounds} rounds, medians)")
    print(f"plain sha256, 1 thread:          {mb / sha:7.0f} MB/s  ({sha:.3f} s wall, {mb / sha_cpu:.0f} MB per CPU second)")
    print(f"full verify (threads):           {mb / verify:7.0f} MB/s  ({verify:.3f} s wall, "
          f"{mb / verify_cpu:.0f} MB per CPU second) = {sha / verify:.2f}x plain sha256's speed")
    print(f"open with cheap checks:          {cheap * 1e3:7.1f} ms")
    print(f"first read of 8 heads, checked:  {read_checked:7.3f} s   unchecked {read_plain:.3f} s   "
          f"(+{read_checked - read_plain:.3f} s once per process)")
    print(f"later reads of 8 heads:          {read_again:7.3f} s   (verified files are not hashed again)")
    print("writes, MB/s wall (MB per CPU second): "
          + "; ".join(f"{name} {mb / wall:.0f} ({mb / cpu:.0f})" for name, (wall, cpu) in
                      [("ShardWriter", written), ("save_file alone", save_only),
                       ("save_file + sha256 read back", save_and_hash)]))
    print(f"lock acquire + release:          {lock_cost * 1e6:7.1f} us")


if __name__ == "__main__":
    main()
