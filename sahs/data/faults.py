"""Named points where a test can kill the process, as a crash or the OOM killer would.

``SAHS_KILL_AT=shard_written:2`` sends SIGKILL to the process the second time it reaches the point
``shard_written`` (``SAHS_KILL_AT=before_manifest`` the first time). The kill is deterministic, so fault
tests need no sleeps or polling. Unset, a point costs one environment lookup.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from typing import IO

POINTS = {
    "shard_write": "halfway through writing a shard's tensor file",
    "shard_renamed": "a shard's tensor file is in place, its sidecar not yet written",
    "shard_written": "a shard and its sidecar are written",
    "before_manifest": "every shard is written, the manifest not yet",
    "manifest_write": "halfway through writing the manifest",
}
_reached: Counter[str] = Counter()


def kill_point(name: str, handle: IO[bytes] | None = None) -> None:
    """SIGKILL this process if ``SAHS_KILL_AT`` names ``name`` and this is its n-th time here.

    ``handle`` (a file being written) is flushed first, so the half-written bytes are on disk.
    """
    spec = os.environ.get("SAHS_KILL_AT")
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point not in POINTS:
        raise ValueError(f"SAHS_KILL_AT={spec!r}: the points are {sorted(POINTS)}")
    if point != name:
        return
    _reached[name] += 1
    if _reached[name] == int(nth or 1):
        if handle is not None:
            handle.flush()
        os.kill(os.getpid(), signal.SIGKILL)
