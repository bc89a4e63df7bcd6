"""``sahs data build``: write a prompt set to disk with its dataset card."""

from __future__ import annotations

USAGE = "usage: sahs data build --config configs/data/offline.yaml  (`sahs data build --help`: every option)"


def main(argv: list[str]) -> None:
    if argv[:1] in (["-h"], ["--help"]):
        print(f"{USAGE}\n\n{__doc__.splitlines()[0]}")
        return
    if not argv or argv[0] != "build":
        raise SystemExit(USAGE)
    from sahs.prompts.build import main as build_main

    build_main(argv[1:])
