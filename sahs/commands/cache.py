"""``sahs cache``: check an activation cache (``verify DIR``) or re-extract only its bad rows (``repair DIR --config C``).

``verify`` reads every file and checksum and names each damaged shard. ``repair`` needs the run config that made the cache (its model and prompt set); a config whose fingerprint
differs is refused, naming what changed. It runs as ``sahs extract`` does, on the configured devices.
"""

from __future__ import annotations

import argparse

USAGE = "usage: sahs cache verify DIR | sahs cache repair DIR --config RUN_CONFIG [config overrides]"


def _verify(argv: list[str]) -> None:
    from sahs.data.integrity import verify_cache

    parser = argparse.ArgumentParser(prog="sahs cache verify", description="Check every file and checksum of a cache.")
    parser.add_argument("dir", help="the cache folder (`data.cache_dir` of the run config)")
    report = verify_cache(parser.parse_args(argv).dir)
    for line in report.problems:
        print(f"  problem: {line}")
    for line in report.notes:
        print(f"  note: {line}")
    if not report.ok:
        raise SystemExit(f"sahs: error: {report.summary()}")
    print(f"[sahs] {report.summary()}")


def _repair(argv: list[str]) -> None:
    from sahs.commands.run_config import parse
    from sahs.data.integrity import verify_cache
    from sahs.extract.distributed import extract_with_trainer

    if argv[:1] in (["-h"], ["--help"]):
        print(f"{USAGE}\n\n{__doc__}")
        return
    if not argv or argv[0].startswith("-"):
        raise SystemExit(USAGE)
    folder, rest = argv[0], argv[1:]
    _, run = parse("cache", rest)
    if run.extraction is None:
        raise SystemExit("sahs: error: this config has no sahs.callbacks.ActivationExtraction in trainer.callbacks: "
                         "it names no model or prompt set to re-extract with")
    callback = run.extraction
    status = extract_with_trainer(folder, callback.model, callback.prompts, callback.extraction,
                                  repair=True, progress=callback.progress, **run.devices)
    report = verify_cache(folder)
    if not report.ok:
        raise SystemExit(f"sahs: error: after the repair, {report.summary()}")
    done = "nothing to repair" if status == "reused" else "repaired"
    print(f"[sahs] activation cache {done}: {report.summary()}")


def main(argv: list[str]) -> None:
    actions = {"verify": _verify, "repair": _repair}
    if argv[:1] in (["-h"], ["--help"]):
        print(f"{USAGE}\n\n{__doc__}")
        return
    if not argv or argv[0] not in actions:
        raise SystemExit(USAGE)
    actions[argv[0]](argv[1:])
