"""Data a Hugging Face user has: a `datasets` folder (save_to_disk), a folder of text files."""

import json

import datasets
import numpy as np
import pytest
from typer.testing import CliRunner

from fedfm.cli import app
from fedfm.config.schema import DataConfig
from fedfm.data.sources import load_text_dataset
from fedfm.errors import FedfmError

ROWS = [
    {"text": "the striker scored a late goal", "label": "sport", "user": "u1"},
    {"text": "a new laptop chip was announced", "label": "tech", "user": "u2"},
    {"text": "bake the bread in a hot oven", "label": "food", "user": "u1"},
    {"text": "the keeper saved a penalty", "label": "sport", "user": "u3"},
    {"text": "cloud servers run the code", "label": "tech", "user": "u2"},
    {"text": "garlic and butter on pasta", "label": "food", "user": "u3"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def load(dataset, **kw):
    return load_text_dataset(DataConfig(dataset=str(dataset), **kw), "seq_cls")


def assert_same(a, b):
    assert a.texts == b.texts
    assert a.label_names == b.label_names
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.groups == b.groups


def test_saved_dataset_loads_like_the_same_rows_from_jsonl(tmp_path):
    reference = load(write_jsonl(tmp_path / "rows.jsonl", ROWS), group_column="user")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    saved = load(tmp_path / "saved", group_column="user")
    assert_same(saved, reference)
    # string labels map to ids in sorted order, as for every file format
    assert saved.label_names == ["food", "sport", "tech"]
    assert saved.labels.tolist() == [1, 2, 0, 1, 2, 0]


def test_saved_dataset_dict_uses_train_or_the_named_split(tmp_path):
    dd = datasets.DatasetDict(train=datasets.Dataset.from_list(ROWS[:4]), test=datasets.Dataset.from_list(ROWS[2:]))
    dd.save_to_disk(str(tmp_path / "dd"))
    assert_same(load(tmp_path / "dd"), load(write_jsonl(tmp_path / "train.jsonl", ROWS[:4])))
    assert_same(load(tmp_path / "dd", split="test"), load(write_jsonl(tmp_path / "test.jsonl", ROWS[2:])))
    with pytest.raises(FedfmError, match=r"no split 'validation'; its splits: \['train', 'test'\]"):
        load(tmp_path / "dd", split="validation")
    datasets.DatasetDict(only=datasets.Dataset.from_list(ROWS)).save_to_disk(str(tmp_path / "one"))
    assert load(tmp_path / "one").texts == [r["text"] for r in ROWS]  # the only split


def test_class_label_column_counts_by_its_names(tmp_path):
    features = datasets.Features(
        text=datasets.Value("string"), label=datasets.ClassLabel(names=["tech", "sport", "food"]))
    names = ["tech", "sport", "food"]
    rows = [{"text": r["text"], "label": names.index(r["label"])} for r in ROWS]
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(tmp_path / "cl"))
    reference = load(write_jsonl(tmp_path / "rows.jsonl", [{"text": r["text"], "label": r["label"]} for r in ROWS]))
    assert_same(load(tmp_path / "cl"), reference)  # "sport", not the ClassLabel's id 1


def test_saved_dataset_column_checks_are_one_line(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(FedfmError, match=r"text column 'body' not in .*available columns: \['text', 'label', 'user'\]"):
        load(tmp_path / "saved", text_column="body")
    with pytest.raises(FedfmError, match="no split"):  # a plain Dataset has none
        load(tmp_path / "saved", split="train")


def test_folder_of_text_files_one_group_per_file(tmp_path):
    folder = tmp_path / "notes"
    (folder / "bob").mkdir(parents=True)
    (folder / "alice.txt").write_text("first note\n\nsecond note\n")
    (folder / "bob" / "day1.txt").write_text("third note\n")
    ds = load_text_dataset(DataConfig(dataset=str(folder), label_column=None), "causal_lm")
    assert ds.texts == ["first note", "second note", "third note"]
    assert ds.groups == ["alice.txt", "alice.txt", "bob/day1.txt"]
    assert ds.labels is None


def test_wrong_folders_give_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("not a dataset")
    with pytest.raises(FedfmError, match="no .txt files in folder .* and it is not a datasets folder"):
        load(tmp_path / "empty")
    broken = tmp_path / "broken"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(broken))
    for arrow in broken.glob("*.arrow"):
        arrow.unlink()
    with pytest.raises(FedfmError, match="cannot read datasets folder .*broken"):
        load(broken)
    # through the command line: one line, non-zero exit, no traceback
    args = ["run", f"data.dataset={broken}", "model.name=tiny-bert", f"out={tmp_path / 'run'}", "progress=false"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "cannot read datasets folder" in result.output and "Traceback" not in result.output
