"""Use a finished run's model without writing Python: ``fedfm eval`` and ``fedfm predict``.

:func:`load_run` rebuilds the run's model once, as the run built it (its
``config.yaml``, ``model.start_from`` resolved; :mod:`fedfm.models.chain`),
and loads ``final_state.safetensors`` into it. Rows come from the run's own
test set or from any file a run can read (:mod:`fedfm.data.sources`: csv,
jsonl, json, parquet, a .txt file or folder), with the run's data settings
and ``key=value`` overrides such as ``data.text_column=body``. Labels in a
file are mapped by name to the run's own labels (stored in the final state's
metadata, :func:`fedfm.eval.summary.state_metadata`), so a file may hold a
subset of the classes in any order.

:func:`evaluate_run` reports the run's metrics (loss and accuracy; token
accuracy and perplexity for causal LM, with
:func:`fedfm.eval.evaluate.score_examples`) and, for classifiers, a
per-class table (:mod:`fedfm.eval.classes`). :func:`predict_run` returns
labels with probabilities, or generated continuations
(:mod:`fedfm.eval.predict`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from fedfm.config import RunConfig, load_config
from fedfm.config.schema import DataConfig
from fedfm.data.encode import encode
from fedfm.data.sources import TextDataset, load_text_dataset
from fedfm.errors import FedfmError
from fedfm.eval.classes import per_class
from fedfm.eval.evaluate import score_examples
from fedfm.eval.predict import class_logits, generate, label_rows
from fedfm.models.assemble import FedModel, assemble_model
from fedfm.models.chain import STATE_FILE, resolve_start
from fedfm.models.state import load_state, set_state_


@dataclass
class TrainedRun:
    """A finished run's model, ready to use."""

    path: Path
    cfg: RunConfig  # the run's config.yaml with the caller's overrides
    fm: FedModel  # the final state loaded, in eval mode
    label_names: list[str] | None  # the run's classes (seq_cls), in id order
    overrides: list[str]  # the caller's key=value overrides of the run's config


def run_files(run_dir: str | Path) -> tuple[Path, Path]:
    """``(config.yaml, final_state.safetensors)`` of a finished run, with a one-line error otherwise."""
    run = Path(run_dir).expanduser()
    if not (run / "config.yaml").is_file():
        raise FedfmError(f"{run} is not a fedfm run folder (no config.yaml)")
    if not (run / STATE_FILE).is_file():
        raise FedfmError(f"{run} is an unfinished run: no {STATE_FILE} (continue it with `fedfm run --resume {run}`)")
    return run / "config.yaml", run / STATE_FILE


def _check_meta(meta: dict, cfg: RunConfig, state_file: Path) -> None:
    for key in ("task", "method"):
        if meta.get(key) and meta[key] != getattr(cfg.model, key):
            raise FedfmError(f"{state_file} holds a {key}={meta[key]} state, but model.{key}={getattr(cfg.model, key)}")


def load_run(run_dir: str | Path, overrides: Iterable[str] = (), device: str | torch.device = "cpu") -> TrainedRun:
    """Rebuild a finished run's model with its final state (one load for every row that follows)."""
    cfg_file, state_file = run_files(run_dir)
    overrides = list(overrides)
    cfg = load_config(cfg_file, overrides)
    state, meta = load_state(state_file)
    _check_meta(meta, cfg, state_file)
    names = json.loads(meta.get("label_names") or "[]") or None
    num_labels = int(meta.get("num_labels") or 0) or None
    if cfg.model.task == "seq_cls" and (names is None or len(names) != num_labels):
        raise FedfmError(f"{state_file} does not name its {num_labels} labels (label_names in its metadata)")
    base = resolve_start(cfg.model)
    fm = assemble_model(base.model_copy(update={"init_state": None}), num_labels, seed=cfg.seed, device=device)
    try:
        set_state_(fm.params, state)
    except FedfmError as err:
        raise FedfmError(
            f"the model {base.name} does not match the run {run_dir} (trained on {meta.get('model', '?')}): {err}"
        ) from None
    fm.model.eval()
    return TrainedRun(Path(run_dir), cfg, fm, names, overrides)


def read_file(run: TrainedRun, path: str, labelled: bool) -> TextDataset:
    """The rows of ``path`` read with the run's data settings (all rows: no ``max_examples``, no groups).

    ``labelled``: a classifier's file must hold the label column; its labels
    are mapped by name to the run's label ids.
    """
    data: DataConfig = run.cfg.data.model_copy(update={"dataset": str(path), "group_column": None})
    if not any(o.split("=", 1)[0].strip() == "data.max_examples" for o in run.overrides):
        data = data.model_copy(update={"max_examples": None})  # every row of the file, unless asked otherwise
    if not labelled:
        data = data.model_copy(update={"label_column": None})
    ds = load_text_dataset(data, run.cfg.model.task if labelled else "causal_lm", seed=run.cfg.seed, min_classes=1)
    if labelled and run.cfg.model.task == "seq_cls":
        if ds.labels is None:
            raise FedfmError(f"{path} has no labels to evaluate a classifier on (data.label_column)")
        ds.labels, ds.label_names = map_labels(ds, run.label_names, path), list(run.label_names)
    return ds


def map_labels(ds: TextDataset, run_names: list[str], path) -> np.ndarray:
    """``ds``'s label ids re-numbered as the run's ids (by name); a label the run does not know is refused."""
    index = {name: i for i, name in enumerate(run_names)}
    unknown = [n for n in ds.label_names if n not in index]
    if unknown:
        raise FedfmError(f"{path}: label(s) {unknown[:5]} are not among the run's labels {run_names}")
    table = np.asarray([index[n] for n in ds.label_names], dtype=np.int64)
    return table[ds.labels]


Holdout = Callable[[RunConfig, TextDataset], np.ndarray]


def own_test_set(run: TrainedRun, holdout: Holdout) -> tuple[TextDataset, np.ndarray]:
    """The run's dataset and its global test rows (``holdout``: the run's split, from the run layer)."""
    cfg = run.cfg
    if cfg.continual.enabled:
        raise FedfmError("a continual run is tested stage by stage: evaluate it on a file with --data FILE")
    data = cfg.data
    if cfg.deploy.test_data is not None:  # a deployed server tested on its own file
        data = data.model_copy(update={"dataset": cfg.deploy.test_data, "group_column": None})
    ds = load_text_dataset(data, cfg.model.task, seed=cfg.seed)
    if cfg.model.task == "seq_cls":
        if ds.labels is None:
            raise FedfmError(f"the run's dataset {data.dataset!r} has no labels")
        ds.labels, ds.label_names = map_labels(ds, run.label_names, data.dataset), list(run.label_names)
    return ds, holdout(cfg, ds)


def evaluate_run(run: TrainedRun, data: str | None = None, holdout: Holdout | None = None,
                 batch_size: int | None = None) -> dict:
    """The run's metrics on ``data`` (a file), or on its own test set (``holdout`` required then)."""
    if data is None:
        if holdout is None:
            raise FedfmError("internal: evaluating on the run's own test set needs its holdout split")
        ds, rows = own_test_set(run, holdout)
    else:
        ds = read_file(run, data, labelled=True)
        rows = np.arange(len(ds), dtype=np.int64)
    if len(rows) == 0:
        raise FedfmError(f"no rows to evaluate in {data or 'the test set of ' + str(run.path)}")
    cfg, fm = run.cfg, run.fm
    bs = batch_size or cfg.eval.batch_size
    seq_cls = cfg.model.task == "seq_cls"
    enc = encode(ds.texts, fm.tokenizer, cfg.model.max_length, ds.labels if seq_cls else None)
    out = {"run": str(run.path), "data": data or "the run's test set", "task": cfg.model.task, "rows": int(len(rows))}
    if not seq_cls:
        scores = score_examples(fm, enc, rows, bs)
        loss = float(scores.loss_sum.sum() / scores.targets.sum())
        out["metrics"] = {"loss": loss, "accuracy": float(scores.correct.sum() / scores.targets.sum()),
                          "perplexity": float(np.exp(min(loss, 50.0)))}
        return out
    logits = class_logits(fm, enc, rows, bs)
    labels = enc.labels[torch.as_tensor(rows)]
    pred = logits.argmax(-1)
    out["metrics"] = {"loss": float(F.cross_entropy(logits, labels)), "accuracy": float((pred == labels).float().mean())}
    out.update(per_class(labels.numpy(), pred.numpy(), run.label_names))
    return out


def predict_run(run: TrainedRun, data: str | None = None, texts: list[str] | None = None,
                batch_size: int | None = None, max_new_tokens: int = 32) -> list[dict]:
    """One record per input row: ``label``, ``probability``, ``probabilities`` (seq_cls) or ``generated``."""
    if (data is None) == (not texts):
        raise FedfmError("give rows to predict: either --data FILE or --text \"...\" (not both)")
    texts = list(texts) if texts else read_file(run, data, labelled=False).texts
    cfg, fm = run.cfg, run.fm
    bs = batch_size or cfg.eval.batch_size
    if cfg.model.task == "causal_lm":
        outs = generate(fm, texts, cfg.model.max_length, max_new_tokens, bs)
        return [{"text": t, "generated": g} for t, g in zip(texts, outs)]
    enc = encode(texts, fm.tokenizer, cfg.model.max_length)
    probs = torch.softmax(class_logits(fm, enc, np.arange(len(texts)), bs), dim=-1)
    return label_rows(texts, probs, run.label_names)


# ----------------------------------------------------------------------------- display


def _short(text: str, n: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def print_evaluation(result: dict, console: Console) -> None:
    """The metrics and, for a classifier, the per-class table."""
    console.print(f"{result['run']} on {result['data']}: {result['rows']} rows", highlight=False, soft_wrap=True)
    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in result["metrics"].items():
        table.add_row(k, f"{v:.4f}")
    console.print(table)
    if "classes" not in result:
        return
    per = Table()
    for col in ("label", "precision", "recall", "f1", "support"):
        per.add_column(col, justify="left" if col == "label" else "right")
    for c in result["classes"]:
        per.add_row(c["label"], f"{c['precision']:.4f}", f"{c['recall']:.4f}", f"{c['f1']:.4f}", str(c["support"]))
    m = result["macro"]
    per.add_row("macro avg", f"{m['precision']:.4f}", f"{m['recall']:.4f}", f"{m['f1']:.4f}", str(result["rows"]),
                style="bold")
    console.print(per)


def print_predictions(records: list[dict], console: Console, limit: int = 20) -> None:
    """The first ``limit`` predictions as a table (the rest: say how many)."""
    table = Table()
    table.add_column("text")
    if records and "generated" in records[0]:
        table.add_column("generated")
        for r in records[:limit]:
            table.add_row(_short(r["text"]), r["generated"])
    else:
        table.add_column("label")
        table.add_column("probability", justify="right")
        for r in records[:limit]:
            table.add_row(_short(r["text"]), r["label"], f"{r['probability']:.4f}")
    console.print(table)
    if len(records) > limit:
        console.print(f"... and {len(records) - limit} more rows (write them all with --out FILE)")
