"""``sahs data build``: write a prompt set to disk with its dataset card."""

from __future__ import annotations


def main(argv: list[str]) -> None:
    if not argv or argv[0] != "build":
        raise SystemExit("usage: sahs data build --config configs/data/offline.yaml")
    from sahs.prompts.build import main as build_main

    build_main(argv[1:])
