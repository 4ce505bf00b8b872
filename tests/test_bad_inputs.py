"""Every bad input gets one clear line and a non-zero exit (issue 14): data files, configs, weights, workers."""

import faulthandler
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from fedfm.cli import app
from fedfm.config import load_config
from fedfm.config.schema import DataConfig
from fedfm.drivers.workers import WorkerGroup
from fedfm.data.sources import load_text_dataset
from fedfm.errors import ConfigError, FedfmError
from fedfm.eval.report import MetricsLog, plot_metrics, write_json
from fedfm.models import build_model, get_state
from fedfm.models import memory
from fedfm.models.registry import _tiny_config, load_base_model, load_tokenizer, minilm_dir, resolve

from test_end_to_end import tiny_cls_overrides

def load(path, task="seq_cls", **data):
    return load_text_dataset(DataConfig(dataset=str(path), label_column="label", **data), task)


def refused(path, **data) -> str:
    with pytest.raises(FedfmError) as err:
        load(path, **data)
    return str(err.value)


# ----------------------------------------------------------------------------- data files

GOOD = [{"text": "good news", "label": "a"}, {"text": "bad news", "label": "b"}]


def write(path: Path, rows=GOOD) -> Path:
    """``rows`` in the format of ``path``'s suffix."""
    df = pd.DataFrame(rows)
    if path.suffix == ".csv":
        df.to_csv(path, index=False)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows, ensure_ascii=False))
    else:
        df.to_parquet(path)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json", ".parquet"])
def test_an_empty_data_file_is_refused_in_every_format(tmp_path, suffix):
    empty = tmp_path / f"empty{suffix}"
    empty.write_bytes(b"")
    assert refused(empty) == f"data file {empty} is empty"


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json", ".parquet"])
def test_a_missing_text_or_label_column_is_named_in_every_format(tmp_path, suffix):
    path = write(tmp_path / f"d{suffix}", [{"body": r["text"], "label": r["label"]} for r in GOOD])
    assert refused(path) == f"text column 'text' not in {path}; available columns: ['body', 'label']"
    path = write(tmp_path / f"e{suffix}", [{"text": r["text"], "y": r["label"]} for r in GOOD])
    assert refused(path) == f"label column 'label' not in {path}; available columns: ['text', 'y']"


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json"])
def test_a_text_file_that_is_not_utf8_is_refused_with_the_byte_and_its_place(tmp_path, suffix):
    path = write(tmp_path / f"latin{suffix}", [{"text": "café", "label": "a"}, {"text": "tea", "label": "b"}])
    path.write_bytes(path.read_bytes().replace("é".encode(), b"\xe9"))  # latin-1, as a legacy editor saves it
    line, column = {".csv": (2, 4), ".jsonl": (1, 14), ".json": (1, 15)}[suffix]
    assert refused(path) == (
        f"data file {path} is not UTF-8 text: byte 0xe9 at line {line}, column {column} (save it as UTF-8)"
    )


def test_truncated_or_garbled_files_are_refused_in_every_format(tmp_path):
    jsonl = tmp_path / "cut.jsonl"
    jsonl.write_text('{"text": "a", "label": "x"}\n{"text": "b", "lab')
    assert refused(jsonl) == f"data file {jsonl}, line 2, column 15: not valid JSON (Unterminated string starting at)"
    json_doc = tmp_path / "cut.json"
    json_doc.write_text('[{"text": "a", "label": "x"}, {"text"')
    assert refused(json_doc) == f"data file {json_doc}, line 1, column 38: not valid JSON (Expecting ':' delimiter)"
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "a", "label": "x"}\n[1, 2]\n')
    assert refused(rows) == f"data file {rows}, line 2: a JSON list, not an object"
    csv = tmp_path / "cut.csv"
    csv.write_text('text,label\n"an unclosed quote,a\nb')
    assert refused(csv) == (
        f"cannot read data file {csv}: ParserError: Error tokenizing data. C error: EOF inside string starting at row 1"
    )
    header = tmp_path / "header.csv"
    header.write_text("text,label\n")
    assert refused(header) == f"data file {header} has no rows (a header at most)"
    parquet = write(tmp_path / "cut.parquet")
    parquet.write_bytes(parquet.read_bytes()[:100])
    assert refused(parquet) == (
        f"cannot read data file {parquet}: ArrowInvalid: Parquet magic bytes not found in footer. "
        "Either the file is corrupted or this is not a parquet file."
    )


def test_a_label_column_with_one_class_is_refused_on_the_command_line(tmp_path):
    """transformers turns num_labels=1 into regression: the run would report accuracy 1.0."""
    one = write(tmp_path / "one.jsonl", [{"text": f"text {i}", "label": "spam"} for i in range(8)])
    assert load(one, task="causal_lm").num_classes == 1  # fine for a language model
    args = [a for a in tiny_cls_overrides(tmp_path) if not a.startswith("data.dataset=")]
    result = CliRunner().invoke(app, ["run", f"data.dataset={one}", *args])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert lines == [
        f"error: dataset '{one}': label column 'label' has 1 distinct label(s) ['spam']; task seq_cls needs at least 2"
    ]
    assert "Traceback" not in result.output


# ----------------------------------------------------------------------------- config


def test_a_yaml_syntax_error_names_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: tiny-bert\n  method: [lora\ntrain:\n  lr: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert str(err.value) == f"{bad}:4:6: not valid YAML: expected ',' or ']', but got ':' (while parsing a flow sequence)"


# ----------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory):
    return load_config(None, tiny_cls_overrides(tmp_path_factory.mktemp("cfg"), **{"model.method": "lora"})).model


@pytest.mark.parametrize("bad, problem", [
    (torch.tensor([1.0, math.nan]), "holds NaN or Inf values"),
    (torch.tensor([math.inf, 0.0]), "holds NaN or Inf values"),
    (torch.tensor([1, 2]), "is torch.int64, not floating point"),
    (torch.tensor([True, False]), "is torch.bool, not floating point"),
])
def test_starting_weights_must_be_finite_floats(tmp_path, tiny_cfg, bad, problem):
    state = get_state(build_model(tiny_cfg, 3).params)
    name = next(iter(state))
    state[name] = bad[torch.arange(state[name].numel()) % 2].reshape(state[name].shape)
    path = tmp_path / "start.safetensors"
    save_file(dict(state), str(path))
    with pytest.raises(FedfmError) as err:
        build_model(tiny_cfg.model_copy(update={"init_state": str(path)}), 3)
    assert str(err.value) == f"model.init_state {path}: tensor {name!r} {problem}"


def test_an_adapter_too_large_for_memory_is_refused_before_allocation(tiny_cfg, monkeypatch):
    huge = tiny_cfg.model_copy(update={"lora": tiny_cfg.lora.model_copy(update={"r": 100_000_000})})
    monkeypatch.setattr(memory, "available_bytes", lambda device: 8 * memory.GIB)
    with pytest.raises(FedfmError) as err:
        build_model(huge, 3)
    assert str(err.value) == (
        "tiny-bert with method lora needs about 381.5 GiB to train (25,601,011,558 parameters, "
        "25,600,000,099 trainable, with gradients and optimizer moments) but only 8.0 GiB is available on cpu: "
        "choose a smaller model or adapter"
    )
    monkeypatch.undo()  # the machine's real free memory: still far too little
    with pytest.raises(FedfmError, match=r"needs about 381\.5 GiB .* but only [\d.]+ GiB is available on cpu"):
        build_model(huge, 3)


def model_folder(tmp_path) -> Path:
    """A local Hugging Face folder: a tiny BERT classifier with MiniLM's tokenizer."""
    from transformers import BertForSequenceClassification

    folder = tmp_path / "model"
    tok_dir = minilm_dir()
    tokenizer = load_tokenizer(tok_dir)
    config = _tiny_config("tiny-bert", len(tokenizer), tokenizer.pad_token_id)
    config.num_labels = 2
    BertForSequenceClassification(config).save_pretrained(str(folder))
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(tok_dir / name, folder / name)
    return folder


def test_a_truncated_or_pickled_model_folder_is_refused_with_its_cause(tmp_path):
    folder = model_folder(tmp_path)
    source = resolve(str(folder))
    tokenizer = load_tokenizer(folder)
    load_base_model(source, "seq_cls", 2, tokenizer)  # the intact folder loads
    weights = folder / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[:-10])  # a download or copy cut short
    with pytest.raises(FedfmError) as err:
        load_base_model(source, "seq_cls", 2, tokenizer)
    assert str(err.value) == (
        f"model folder {folder}: model.safetensors is truncated ({len(whole) - 10:,} bytes, its header describes "
        f"{len(whole):,})"
    )
    weights.write_bytes(whole[:1000])
    with pytest.raises(FedfmError) as err:
        load_base_model(source, "seq_cls", 2, tokenizer)
    assert str(err.value) == f"model folder {folder}: model.safetensors is truncated (1,000 bytes, its header is cut)"
    weights.unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not read: it would be unpickled")
    with pytest.raises(FedfmError) as err:
        load_base_model(source, "seq_cls", 2, tokenizer)
    assert str(err.value) == (
        f"model folder {folder} has only pickle weights (pytorch_model.bin): "
        "fedfm accepts only safetensors weights (model.safetensors)"
    )


# ----------------------------------------------------------------------------- outputs


def strict_loads(text: str):
    """``json.loads`` that fails on the non-standard constants NaN, Infinity and -Infinity."""
    def refuse(constant):
        raise AssertionError(f"non-strict JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def test_metrics_and_summary_are_strict_json_with_null_for_non_finite(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    records = [{"round": 0, "test_accuracy": 0.5, "test_loss": 1.0},
               {"round": 1, "train_loss": math.nan, "bytes_up_total": 10},
               {"round": 2, "train_loss": 0.5, "test_accuracy": math.inf, "test_loss": 0.9,
                "nested": [np.float32("nan")]}]
    for r in records:
        log.write(r)
    log.close()
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    back = [strict_loads(line) for line in text.splitlines()]
    assert back[1]["train_loss"] is None and back[2]["test_accuracy"] is None and back[2]["nested"] == [None]
    write_json(tmp_path / "summary.json", {"final_accuracy": math.nan, "privacy": {"epsilon": math.inf}})
    assert strict_loads((tmp_path / "summary.json").read_text()) == {"final_accuracy": None, "privacy": {"epsilon": None}}
    plot_metrics(back, tmp_path / "metrics.png", "seq_cls")  # what a resumed run plots: records read back
    assert (tmp_path / "metrics.png").stat().st_size > 0


# ----------------------------------------------------------------------------- workers

def test_a_failing_worker_is_reported_by_the_main_process(tmp_path, monkeypatch):
    """workers=2 and worker 1 fails: the main process, whose collective breaks, names worker 1's own error."""
    real = WorkerGroup.sum_tensors

    def sum_tensors(self, tensors):
        if self.rank == 1:
            raise RuntimeError("disk full in worker one")
        return real(self, tensors)

    monkeypatch.setattr(WorkerGroup, "sum_tensors", sum_tensors)  # the forked worker inherits it
    args = tiny_cls_overrides(tmp_path, workers=2, threads=1, **{"federation.rounds": 2, "train.local_steps": 2,
                                                                  "eval.every": 0})
    faulthandler.dump_traceback_later(120, exit=True)  # a hang ends the session instead of blocking it
    try:
        start = time.monotonic()
        result = CliRunner().invoke(app, ["run", *args])
        took = time.monotonic() - start
    finally:
        faulthandler.cancel_dump_traceback_later()
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == ["error: worker 1 failed: RuntimeError: disk full in worker one"]
    assert took < 60
