"""The schema's validation, the content hash, and the mixing / saved-set sources."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import datasets
import pytest
from PIL import Image

from sahs.prompts.schema import (
    FEATURES,
    PROVENANCE_FILE,
    Mixture,
    PromptSource,
    Provenance,
    SavedPrompts,
    make_dataset,
    prompt_set_hash,
)


def _image(colour: tuple[int, int, int] = (10, 20, 30)) -> Image.Image:
    image = Image.new("RGB", (8, 6), "white")
    image.putpixel((3, 2), colour)
    return image


def _record(rid: str, **changes: Any) -> dict[str, Any]:
    record = dict(id=rid, text=f"request {rid}", image=None, label=0, attack="text", source="unit", category="c")
    return {**record, **changes}


def _records() -> list[dict[str, Any]]:
    return [_record("a"), _record("b", image=_image(), attack="figstep", label=1), _record("c", label=1)]


class Fixed(PromptSource):
    """A source returning fixed records, for mixing tests."""

    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.records = records

    def load(self) -> datasets.Dataset:
        return make_dataset(self.records)

    def provenance(self) -> dict[str, Provenance]:
        return {r["id"]: Provenance("MIT", f"unit:{r['id']}") for r in self.records}


def test_make_dataset_has_the_schema_and_decodes_images() -> None:
    ds = make_dataset(_records())
    assert ds.features == FEATURES and ds.column_names == list(FEATURES)
    assert ds[0]["image"] is None and ds[1]["image"].size == (8, 6)
    assert ds[1]["image"].getpixel((3, 2)) == (10, 20, 30)
    assert len(make_dataset([])) == 0


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ([_record("a"), _record("a")], "'a' occurs more than once"),
        ([_record("x", label=2)], "'x'.*label"),
        ([_record("y", label=True)], "'y'.*label"),
        ([_record("z", text="   ")], "'z'.*text"),
        ([_record("w", attack="")], "'w'.*attack"),
        ([{k: v for k, v in _record("v").items() if k != "category"}], "'v'.*missing \\['category'\\]"),
        ([_record("u", image="not-an-image")], "'u'.*image"),
    ],
)
def test_make_dataset_names_the_offending_id(bad: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_dataset(bad)


def test_hash_is_stable_and_sensitive_to_every_field() -> None:
    base = prompt_set_hash(make_dataset(_records()))
    assert base == prompt_set_hash(make_dataset(_records()))
    changed_pixel = _records()
    changed_pixel[1]["image"] = _image((10, 20, 31))
    variants = [changed_pixel]
    for column, value in [("text", "request b!"), ("label", 0), ("attack", "typo"), ("source", "x"), ("category", "d"),
                          ("group", "a")]:
        records = _records()
        records[1][column] = value
        variants.append(records)
    variants.append(_records()[::-1])  # row order is content
    hashes = {prompt_set_hash(make_dataset(v)) for v in variants}
    assert base not in hashes and len(hashes) == len(variants)


def test_hash_depends_on_pixels_not_on_file_format(tmp_path: Path) -> None:
    as_png = prompt_set_hash(make_dataset(_records()))
    bmp = tmp_path / "b.bmp"
    _image().save(bmp)
    records = _records()
    records[1]["image"] = {"path": str(bmp), "bytes": None}
    assert prompt_set_hash(make_dataset(records)) == as_png
    grey = _records()
    grey[1]["image"] = _image().convert("L")  # same picture, other mode: different pixels
    assert prompt_set_hash(make_dataset(grey)) != as_png


def test_hash_follows_select_and_filter() -> None:
    ds = make_dataset(_records())
    assert prompt_set_hash(ds.select([0, 2])) == prompt_set_hash(make_dataset([_records()[0], _records()[2]]))
    assert prompt_set_hash(ds.filter(lambda label: label == 1, input_columns="label")) == prompt_set_hash(
        make_dataset(_records()[1:])
    )


def test_mixture_concatenates_filters_and_rejects_collisions() -> None:
    first, second = Fixed(_records()), Fixed([_record("d", attack="typo", label=1)])
    mixed = Mixture([first, second]).load()
    assert mixed["id"] == ["a", "b", "c", "d"]
    assert Mixture([first, second], attacks=["typo", "figstep"]).load()["id"] == ["b", "d"]
    assert set(Mixture([first, second]).provenance()) == {"a", "b", "c", "d"}
    with pytest.raises(ValueError, match=r"\['audio'\] are not in the sources"):
        Mixture([first], attacks=["audio"]).load()
    with pytest.raises(ValueError, match=r"more than one source.*'a'"):
        Mixture([first, Fixed([_record("a")])]).load()


def test_saved_prompts_round_trip(tmp_path: Path) -> None:
    ds = make_dataset(_records())
    ds.save_to_disk(str(tmp_path / "set"))
    (tmp_path / "set" / PROVENANCE_FILE).write_text(json.dumps({"id": "a", "licence": "MIT", "origin": "o"}) + "\n")
    source = SavedPrompts(str(tmp_path / "set"))
    assert prompt_set_hash(source.load()) == prompt_set_hash(ds)
    assert source.provenance() == {"a": Provenance("MIT", "o")}
    with pytest.raises(FileNotFoundError, match="nowhere"):
        SavedPrompts(str(tmp_path / "nowhere")).load()
    datasets.Dataset.from_dict({"id": ["a"]}).save_to_disk(str(tmp_path / "other"))
    with pytest.raises(ValueError, match="schema"):
        SavedPrompts(str(tmp_path / "other")).load()


def test_png_bytes_entries_are_accepted() -> None:
    buffer = io.BytesIO()
    _image().save(buffer, format="PNG")
    records = _records()
    records[1]["image"] = {"bytes": buffer.getvalue(), "path": None}
    assert prompt_set_hash(make_dataset(records)) == prompt_set_hash(make_dataset(_records()))


def test_group_defaults_to_the_id_and_sets_saved_without_it_still_load(tmp_path: Path) -> None:
    ds = make_dataset([_record("a"), _record("b", group="q1"), _record("c", group="q1")])
    assert ds["group"] == ["a", "q1", "q1"]
    with pytest.raises(ValueError, match="'d'.*group"):
        make_dataset([_record("d", group="")])
    old = ds.remove_columns("group")  # the layout of sets saved before the group column
    old.save_to_disk(str(tmp_path / "old"))
    loaded = SavedPrompts(str(tmp_path / "old")).load()
    assert loaded.features == FEATURES and loaded["group"] == ["a", "b", "c"]
