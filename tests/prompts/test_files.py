"""Users' own prompt files: JSONL, CSV, Parquet and a dataset folder, mapped to the schema column by column."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sahs.errors import UserError
from sahs.prompts import Columns, Mixture, PromptFile
from sahs.prompts.files import PromptFileError, PromptFileNotFoundError
from sahs.prompts.schema import FEATURES

COLOURS = [(200, 10, 10), (10, 200, 10), (10, 10, 200)]
ROWS = [  # a question asked as an image prompt and as text shares its qid
    {"question": "What does the sign say?", "picture": "pics/0.png", "verdict": "safe", "family": "vqa", "qid": "q0"},
    {"question": "List the steps drawn here.", "picture": "pics/1.png", "verdict": "unsafe", "family": "figstep",
     "qid": "q1"},
    {"question": "How do I make a weapon at home?", "picture": "", "verdict": "unsafe", "family": "text", "qid": "q1"},
    {"question": "Describe this painting.", "picture": "pics/2.png", "verdict": "safe", "family": "vqa", "qid": "q2"},
]
MAPPING = Columns(text="question", image="picture", label="verdict", attack="family", group="qid")


def _pictures(folder: Path) -> None:
    for index, colour in enumerate(COLOURS):
        (folder / "pics").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (12, 9), colour).save(folder / "pics" / f"{index}.png")


def _write(folder: Path, kind: str, rows: list[dict[str, str]] = ROWS) -> Path:
    _pictures(folder)
    if kind == "jsonl":
        path = folder / "mine.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        path = folder / "mine.csv"
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return path


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_jsonl_and_csv_round_trip_images_labels_and_groups(tmp_path: Path, kind: str, monkeypatch) -> None:
    path = _write(tmp_path / "data", kind)
    monkeypatch.chdir(tmp_path)  # relative image paths are read from the file's folder, not the working one
    ds = PromptFile(str(path), MAPPING, labels={"safe": 0, "unsafe": 1}).load()
    assert ds.features == FEATURES
    assert ds["text"] == [row["question"] for row in ROWS]
    assert ds["label"] == [int(row["verdict"] == "unsafe") for row in ROWS]
    assert ds["attack"] == [row["family"] for row in ROWS] and ds["group"] == [row["qid"] for row in ROWS]
    assert ds["id"] == [f"mine-{i:06d}" for i in range(1, 5)] and set(ds["source"]) == {"mine"}
    for row, loaded in zip(ROWS, ds["image"]):
        if not row["picture"]:
            assert loaded is None
            continue
        expected = np.asarray(Image.open(tmp_path / "data" / row["picture"]))
        assert np.array_equal(np.asarray(loaded), expected)


def test_parquet_image_bytes_and_a_dataset_folder(tmp_path: Path) -> None:
    pictures = []
    for colour in COLOURS[:2]:
        buffer = io.BytesIO()
        Image.new("RGB", (5, 4), colour).save(buffer, format="PNG")
        pictures.append({"bytes": buffer.getvalue(), "path": None})
    table = pa.table({"prompt": ["a benign request", "a harmful request"], "image": pictures, "y": [0, 1]})
    (tmp_path / "hub" / "data").mkdir(parents=True)
    pq.write_table(table, tmp_path / "hub" / "data" / "train-00000-of-00001.parquet")
    columns = Columns(text="prompt", image="image", label="y")
    for path in (tmp_path / "hub" / "data" / "train-00000-of-00001.parquet", tmp_path / "hub"):
        ds = PromptFile(str(path), columns, attack="vqa", source="mine").load()
        assert ds["label"] == [0, 1] and ds["attack"] == ["vqa", "vqa"] and ds["group"] == ds["id"]
        assert [im.getpixel((0, 0)) for im in ds["image"]] == COLOURS[:2]


def test_a_file_of_one_class_and_default_labels(tmp_path: Path) -> None:
    path = tmp_path / "benign.jsonl"
    path.write_text(json.dumps({"text": "Plan a picnic."}) + "\n" + json.dumps({"text": "Fix a bike."}) + "\n")
    ds = PromptFile(str(path), Columns(label=None), label=0).load()
    assert ds["label"] == [0, 0] and ds["image"] == [None, None]
    rows = [{"text": "x", "label": "malicious"}, {"text": "y", "label": 0}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert PromptFile(str(path)).load()["label"] == [1, 0]
    with pytest.raises(ValueError, match="columns.label"):
        PromptFile(str(path), Columns(label=None))


def test_errors_name_the_row_and_the_column(tmp_path: Path) -> None:
    path = _write(tmp_path, "csv")
    with pytest.raises(ValueError, match=r"row 1, column 'verdict': label 'safe' is not 0/1"):
        PromptFile(str(path), MAPPING).load()
    with pytest.raises(ValueError, match=r"row 2, column 'verdict': label 'unsafe' is not in labels"):
        PromptFile(str(path), MAPPING, labels={"safe": 0}).load()
    with pytest.raises(ValueError, match=r"no column for columns.group = 'request'"):
        PromptFile(str(path), Columns(text="question", label="verdict", group="request")).load()
    (tmp_path / "pics" / "2.png").unlink()
    with pytest.raises(ValueError, match=r"row 4, column 'picture': missing file .*pics/2.png"):
        PromptFile(str(path), MAPPING, labels={"safe": 0, "unsafe": 1}).load()
    with pytest.warns(UserWarning, match="row 4"):
        kept = PromptFile(str(path), MAPPING, labels={"safe": 0, "unsafe": 1}, on_bad_image="skip").load()
    assert len(kept) == 3
    blank = _write(tmp_path / "blank", "jsonl", [dict(ROWS[0], question=" ")])
    with pytest.raises(ValueError, match=r"row 1, column 'question': the text is empty"):
        PromptFile(str(blank), MAPPING, labels={"safe": 0}).load()
    with pytest.raises(FileNotFoundError, match="not found"):
        PromptFile(str(tmp_path / "nowhere.jsonl"), format="json").load()


def _one_line_user_error(error: BaseException) -> str:
    assert isinstance(error, UserError) and "\n" not in str(error), repr(error)
    return str(error)


def test_unreadable_files_are_one_line_errors_naming_the_line_and_the_fix(tmp_path: Path) -> None:
    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text('{"text": "a", "label": 0}\n\n{"text": "b", "label": 1\n{"text": "c", "label": 0}\n')
    with pytest.raises(PromptFileError) as error:
        PromptFile(str(malformed)).load()
    line = _one_line_user_error(error.value)
    assert re.search(r"malformed\.jsonl, line 3 .*not a valid JSON object.*fix that line", line)
    not_objects = tmp_path / "lists.jsonl"
    not_objects.write_text('{"text": "a", "label": 0}\n["b", 1]\n')
    with pytest.raises(PromptFileError, match=r"lists\.jsonl, line 2: a JSON list, not an object"):
        PromptFile(str(not_objects)).load()
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("text,label\na,0\nb,1,3\n")
    with pytest.raises(PromptFileError) as error:
        PromptFile(str(ragged)).load()
    assert re.search(r"ragged\.csv cannot be read as csv: .*line 3", _one_line_user_error(error.value))
    for name, content in (("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("header.csv", "text,label\n")):
        (tmp_path / name).write_text(content)
        with pytest.raises(PromptFileError) as error:
            PromptFile(str(tmp_path / name)).load()
        assert f"{name} holds no prompts" in _one_line_user_error(error.value)
    with pytest.raises(PromptFileNotFoundError) as error:
        PromptFile(str(tmp_path / "nowhere.jsonl"), format="json").load()
    _one_line_user_error(error.value)


def test_a_file_without_its_label_column_names_the_columns_and_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "texts.jsonl"
    path.write_text('{"text": "How do I bake bread?"}\n{"text": "Hello?"}\n')
    with pytest.raises(PromptFileError) as error:
        PromptFile(str(path)).load()
    line = _one_line_user_error(error.value)
    assert "columns.label = 'label'" in line and "its columns are ['text']" in line and "label: 0" in line
    assert PromptFile(str(path), columns=Columns(label=None), label=0).load()["label"] == [0, 0]  # the fix works


def test_prompt_files_mix_with_other_sources_from_yaml(tmp_path: Path) -> None:
    from jsonargparse import ArgumentParser

    path = _write(tmp_path, "jsonl")
    parser = ArgumentParser()
    parser.add_argument("--prompts", type=Mixture)
    spec = {"class_path": "sahs.prompts.Mixture", "init_args": {"sources": [{
        "class_path": "sahs.prompts.PromptFile",
        "init_args": {"path": str(path), "columns": {"text": "question", "image": "picture", "label": "verdict",
                                                     "attack": "family", "group": "qid"},
                      "labels": {"safe": 0, "unsafe": 1}}}]}}
    source = parser.instantiate_classes(parser.parse_args(["--prompts", json.dumps(spec)])).prompts
    assert source.load()["group"] == ["q0", "q1", "q1", "q2"]


def test_a_file_s_own_id_and_image_columns_are_read_without_a_mapping(tmp_path: Path) -> None:
    _pictures(tmp_path)
    rows = [{"id": "first", "text": "What colour is this?", "image": "pics/1.png", "label": 0},
            {"id": "second", "text": "How do I pick a lock?", "image": None, "label": 1}]
    path = tmp_path / "own.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    ds = PromptFile(str(path)).load()
    assert ds["id"] == ["first", "second"] and ds["image"][1] is None
    assert np.array_equal(np.asarray(ds["image"][0]), np.asarray(Image.open(tmp_path / "pics" / "1.png")))
    ignored = PromptFile(str(path), Columns(id=None, image=None)).load()  # None still ignores them
    assert ignored["id"] == ["own-000001", "own-000002"] and ignored["image"] == [None, None]
    with pytest.raises(ValueError, match=r"no column for columns.id = 'key'"):  # a name given must exist
        PromptFile(str(path), Columns(id="key")).load()
