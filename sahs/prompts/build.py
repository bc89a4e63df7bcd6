"""``sahs data build``: write a prompt set to disk with a dataset card and per-row provenance.

The output folder is written next to its final place and moved in when complete, so a failed build
leaves nothing half-written; a folder holding anything other than an earlier build is never touched.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import datasets
from jsonargparse import ActionConfigFile, ArgumentParser

from sahs.prompts.render import font_path
from sahs.prompts.schema import LABEL_NAMES, PROVENANCE_FILE, PromptSource, Provenance, prompt_set_hash

MANIFEST = "sahs_build.json"
CARD = "README.md"
# Everything an earlier build may contain; any other entry means the folder holds something else.
_BUILD_ENTRIES = {MANIFEST, CARD, PROVENANCE_FILE, "dataset_info.json", "state.json"}


def _is_build_entry(name: str) -> bool:
    """Files of a saved set: ours, its arrow shards, and cache files ``datasets`` writes beside them."""
    return name in _BUILD_ENTRIES or (name.startswith(("data-", "cache-")) and name.endswith(".arrow"))


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse a folder that holds anything but an earlier build, and an earlier build unless ``overwrite``."""
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"{output} is a file, not a folder; choose another --output")
    entries = sorted(p.name for p in output.iterdir()) if output.is_dir() else []
    if not entries:
        return
    foreign = [name for name in entries if not _is_build_entry(name)]
    if foreign or MANIFEST not in entries:
        shown = foreign or entries
        raise FileExistsError(
            f"{output} already holds files that `sahs data build` did not write (e.g. {shown[:5]}); refusing to "
            "write there so nothing is lost. Choose a new or empty folder with --output, or move those files away."
        )
    if not overwrite:
        raise FileExistsError(
            f"{output} already holds a prompt set built earlier; pass --overwrite true to replace it, "
            "or choose another folder with --output."
        )


def _table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def dataset_card(ds: datasets.Dataset, provenance: dict[str, Provenance], digest: str, config: str) -> str:
    """A README recording the configuration, counts per family and label, and each row's licence and origin."""
    counts = Counter(zip(ds["attack"], ds["label"]))
    families = sorted({attack for attack, _ in counts})
    family_rows = [[a, counts[(a, 0)], counts[(a, 1)], counts[(a, 0)] + counts[(a, 1)]] for a in families]
    licences = (provenance[i].licence if i in provenance else "not recorded" for i in ds["id"])
    by_source = Counter(zip(ds["source"], licences))
    parts = [
        "# Prompt set",
        f"Written by `sahs data build`: {len(ds)} prompts rendering {len(set(ds['group']))} distinct requests "
        f"(the `group` column; splits keep a request on one side); content hash (`prompt_set_hash`) `{digest}`.",
        f"Font for rendered images: `{font_path() or 'Pillow built-in font'}`.",
        "Labels: " + ", ".join(f"{i} = {name}" for i, name in enumerate(LABEL_NAMES)) + ".",
        "## Configuration",
        f"```yaml\n{config.strip()}\n```",
        "## Prompts per attack family and label",
        _table(["attack", LABEL_NAMES[0], LABEL_NAMES[1], "total"], family_rows),
        "## Sources and licences",
        _table(["source", "licence", "prompts"], [[s, lic, n] for (s, lic), n in sorted(by_source.items())]),
        "## Licence and origin of each prompt",
        "The same records are in `provenance.jsonl`.",
    ]
    if provenance:
        parts.append(_table(["id", "licence", "origin"], [[i, p.licence, p.origin] for i, p in provenance.items()]))
    else:
        parts.append("This source records no per-prompt provenance.")
    return "\n\n".join(parts) + "\n"


def build(source: PromptSource, output: str, overwrite: bool = False, config: str = "") -> Path:
    """Load ``source`` and write it to ``output`` with ``save_to_disk``, a card, provenance and a manifest."""
    target = Path(output).expanduser().resolve()
    check_output(target, overwrite)
    ds = source.load()
    recorded = source.provenance()
    provenance = {i: recorded[i] for i in ds["id"] if i in recorded}  # in row order, without dropped rows
    digest = prompt_set_hash(ds)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        ds.save_to_disk(str(staging))
        (staging / CARD).write_text(dataset_card(ds, provenance, digest, config), encoding="utf-8")
        lines = (json.dumps({"id": i, "licence": p.licence, "origin": p.origin}, ensure_ascii=False)
                 for i, p in provenance.items())
        (staging / PROVENANCE_FILE).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        manifest = {"rows": len(ds), "hash": digest, "source": f"{type(source).__module__}.{type(source).__name__}"}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        check_output(target, overwrite)  # the folder may have changed while the set was loading
        retired = target.parent / f".{target.name}.old-{os.getpid()}"
        if target.is_dir():
            target.rename(retired)
        try:
            staging.rename(target)
        except OSError:
            if retired.is_dir():
                retired.rename(target)  # put the earlier build back
            raise
        shutil.rmtree(retired, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def build_parser() -> ArgumentParser:
    """The argument parser of ``sahs data build``."""
    parser = ArgumentParser(prog="sahs data build", description="Write a prompt set to disk with a dataset card.")
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with the options below.")
    parser.add_argument("--output", type=str, required=True,
                        help="Folder to write; must be new, empty or an earlier build.")
    parser.add_argument("--source", type=PromptSource, required=True, help="Prompt source (class_path / init_args).")
    parser.add_argument("--overwrite", type=bool, default=False, help="Replace an earlier build in --output.")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``sahs data build``; ``argv`` excludes the command words."""
    parser = build_parser()
    cfg = parser.parse_args(argv)
    config = parser.dump(cfg)
    init = parser.instantiate(cfg)
    path = build(init.source, init.output, overwrite=init.overwrite, config=config)
    print(f"wrote {json.loads((path / MANIFEST).read_text())['rows']} prompts to {path}")


if __name__ == "__main__":
    main()
