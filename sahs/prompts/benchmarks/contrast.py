"""Loaders for benchmarks with benign prompts: safe/unsafe contrast sets and a general VQA benchmark."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from sahs.prompts.benchmarks.base import BenchmarkSource, OnBadImage, image_file

VLGuardSubset = Literal["safe_safes", "safe_unsafes", "unsafes"]


class VLGuard(BenchmarkSource):
    """VLGuard (Zong et al. 2024): natural images with safe and unsafe instructions.

    Layout: ``<split>.json``, a list of {id, image, safe, instr-resp} entries, with the images under
    ``<split>/`` (the unpacked ``<split>.zip``). A safe image carries a ``safe_instruction`` (subset
    safe_safes, label 0) and an ``unsafe_instruction`` (safe_unsafes, label 1); an unsafe image
    carries an ``instruction`` (unsafes, label 1) and a harmful_category. The instructions about one
    image share a group (``vlguard-<split>-<id>``): a split keeps the picture on one side.
    """

    benchmark = "vlguard"
    home = "https://huggingface.co/datasets/ys-zong/VLGuard"
    layout = "<split>.json and the images under <split>/ (e.g. test.json and test/)"

    def __init__(
        self,
        root: str,
        split: Literal["test", "train"] = "test",
        subsets: list[VLGuardSubset] = ["safe_safes", "safe_unsafes", "unsafes"],
        image_dir: str | None = None,
        attack: str = "vqa",
        on_bad_image: OnBadImage = "error",
    ) -> None:
        """
        Args:
            root: Folder holding <split>.json.
            split: Which split to read.
            subsets: Which instruction kinds to keep (safe_safes are the benign prompts).
            image_dir: Folder of the split's images; None means <root>/<split>.
            attack: Attack family name given to every row (natural image plus a plain request).
            on_bad_image: Drop prompts with a missing or unreadable image ("skip") or stop ("error").
        """
        super().__init__(root, on_bad_image)
        self.split = split
        self.subsets = list(subsets)
        self.image_dir = image_dir
        self.attack = attack

    def rows(self, images: bool = True) -> list[dict[str, Any]]:
        file = self.root_path / f"{self.split}.json"
        entries = self.read_json(file, f"{self.split} annotations")
        folder = Path(self.image_dir).expanduser() if self.image_dir else self.root_path / self.split
        self.require(folder, f"{self.split} images")
        rows = []
        for entry in entries:
            if entry["safe"]:
                kinds = [("safe_safes", 0, "safe_instruction"), ("safe_unsafes", 1, "unsafe_instruction")]
            else:
                kinds = [("unsafes", 1, "instruction")]
            for subset, label, key in kinds:
                if subset not in self.subsets:
                    continue
                category = subset if entry["safe"] else f"unsafes/{entry.get('harmful_category', 'unspecified')}"
                texts = [pair[key] for pair in entry["instr-resp"] if key in pair]
                for n, text in enumerate(texts):
                    rows.append(dict(id=f"vlguard-{self.split}-{subset}-{entry['id']}-{n}", text=text,
                                     image=image_file(folder / entry["image"]), label=label, attack=self.attack,
                                     source=self.benchmark, category=category,
                                     group=f"vlguard-{self.split}-{entry['id']}",
                                     origin=f"{file}#{entry['id']}/{key}/{n}"))
        return rows


class XSTest(BenchmarkSource):
    """XSTest (Röttger et al. 2024): text-only safe prompts that sound unsafe, and unsafe contrasts.

    Layout: ``xstest_prompts.csv`` with columns prompt, type, label ("safe" / "unsafe") and optionally
    id; ``path`` may name the csv itself or the folder holding it. Each prompt is a request of its own.
    """

    benchmark = "xstest"
    home = "https://github.com/paul-rottger/xstest"
    layout = "xstest_prompts.csv with columns id, prompt, type, label"

    def __init__(self, path: str, attack: str = "text",
                 labels: list[Literal["safe", "unsafe"]] = ["safe", "unsafe"]) -> None:
        """
        Args:
            path: The csv file, or the folder holding xstest_prompts.csv.
            attack: Attack family name given to every row.
            labels: Which prompts to keep: ["safe"] is XSTest-safe, the benign prompts only.
        """
        super().__init__(path, "error")
        self.path = path
        self.attack = attack
        self.labels = list(labels)

    def rows(self, images: bool = True) -> list[dict[str, Any]]:
        file = self.root_path if self.root_path.suffix == ".csv" else self.root_path / "xstest_prompts.csv"
        rows = []
        for line, q in enumerate(self.read_csv(file, "prompt table", ("prompt", "type", "label")), start=2):
            if q["label"] not in ("safe", "unsafe"):
                raise ValueError(f"{self.benchmark}: {file} row {line} has label {q['label']!r}, not safe/unsafe")
            if q["label"] not in self.labels:
                continue
            rid = f"xstest-{q.get('id') or line - 1}"
            rows.append(dict(id=rid, text=q["prompt"], image=None, label=int(q["label"] == "unsafe"),
                             attack=self.attack, source=self.benchmark, category=q["type"], group=rid,
                             origin=f"{file}#row{line}"))
        return rows


class MMVet(BenchmarkSource):
    """MM-Vet (Yu et al. 2024): benign questions about images, testing integrated capabilities (label 0).

    Layout: ``mm-vet.json`` mapping ids such as "v1_0" to {imagename, capability, question, answer},
    with the images under ``images/``. Each question is a request of its own.
    """

    benchmark = "mm-vet"
    home = "https://github.com/yuweihao/MM-Vet"
    layout = "mm-vet.json and images/<imagename>"

    def __init__(self, root: str, attack: str = "vqa", on_bad_image: OnBadImage = "error") -> None:
        """
        Args:
            root: Folder holding mm-vet.json and images/.
            attack: Attack family name given to every row (natural image plus a plain request).
            on_bad_image: Drop prompts with a missing or unreadable image ("skip") or stop ("error").
        """
        super().__init__(root, on_bad_image)
        self.attack = attack

    def rows(self, images: bool = True) -> list[dict[str, Any]]:
        file = self.root_path / "mm-vet.json"
        questions = self.read_json(file, "questions")
        folder = self.require(self.root_path / "images", "image folder")
        rows = []
        for key, q in questions.items():
            category = ",".join(q.get("capability", [])) or "unspecified"
            rows.append(dict(id=f"mmvet-{key}", text=q["question"], image=image_file(folder / q["imagename"]), label=0,
                             attack=self.attack, source=self.benchmark, category=category, group=f"mmvet-{key}",
                             origin=f"{file}#{key}"))
        return rows
