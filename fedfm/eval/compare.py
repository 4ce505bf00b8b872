"""``fedfm compare RUN_DIR...``: runs side by side, one table and one plot.

A run folder is read from its own files, never from a running process:

* ``config.yaml`` (written when the run starts) makes a folder a run; its
  flattened keys (``federation.rounds``) whose values differ between the runs
  are the table's last columns (``out``, the folder itself, is left out);
* ``summary.json`` (written at the end) gives the final metrics (its
  ``final`` block: ``test_accuracy``, ``test_loss``, ``test_perplexity`` ...),
  bytes, wall time and rounds;
* ``metrics.jsonl`` (one record per round) gives the curves, and, for a run
  without summary.json (still running, or killed), the same numbers from its
  last records: such a run is marked ``unfinished``.

:func:`compare_runs` returns the table's rows; :func:`render_table` makes the
rich table; :func:`plot_runs` overlays one metric per round (and per uploaded
megabyte) of every run in one PNG.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedfm.errors import FedfmError

SKIPPED_KEYS = ("out",)  # differs between any two runs: the row's folder already names it
FIGSIZE, DPI = (12.0, 4.5), 100  # the PNG is 1200 x 450 pixels


@dataclass
class RunRecord:
    """What one run folder holds."""

    path: Path
    label: str
    config: dict[str, Any]  # flattened config.yaml
    records: list[dict]  # metrics.jsonl
    summary: dict | None  # summary.json; None: unfinished

    @property
    def finished(self) -> bool:
        return self.summary is not None

    @property
    def task(self) -> str:
        return self.config.get("model.task") or (self.summary or {}).get("task") or "seq_cls"


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as ``{"a.b": value}``; lists and empty mappings are values."""
    if not isinstance(data, dict) or (not data and prefix):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise FedfmError(f"cannot read {path}: {err}") from None


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl's records; a torn last line (a run killed mid-write) is dropped."""
    if not path.is_file():
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise FedfmError(f"cannot read {path}: {err}") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines):  # the line being written when the run stopped
                break
            raise FedfmError(f"{path}, line {number}: not a JSON record") from None
        if not isinstance(record, dict) or "round" not in record:
            raise FedfmError(f"{path}, line {number}: not a metrics record (no 'round')")
        records.append(record)
    return records


def load_run(path: str | Path, label: str | None = None) -> RunRecord:
    """Read one run folder; one-line errors for a folder that is not a run."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FedfmError(f"run folder not found: {folder}")
    config_file = folder / "config.yaml"
    if not config_file.is_file():
        raise FedfmError(f"{folder} is not a run folder (no config.yaml)")
    try:
        config = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise FedfmError(f"cannot read {config_file}: {str(err).splitlines()[0]}") from None
    if not isinstance(config, dict):
        raise FedfmError(f"{config_file} does not hold a run config (a mapping)")
    summary_file = folder / "summary.json"
    summary = _read_json(summary_file) if summary_file.is_file() else None
    if summary is not None and not isinstance(summary, dict):
        raise FedfmError(f"{summary_file} does not hold a run summary (a JSON object)")
    records = read_metrics(folder / "metrics.jsonl")
    if summary is None and not records:
        raise FedfmError(f"run {folder} has no metrics yet (no summary.json, no rounds in metrics.jsonl)")
    # a key added to the schema after the run was made: the run had its default
    return RunRecord(folder, label or folder.name, {**schema_defaults(), **flatten(config)}, records, summary)


def load_runs(paths: list[str]) -> list[RunRecord]:
    """The runs at ``paths``, labelled by their paths below the folder they share."""
    if not paths:
        raise FedfmError("fedfm compare needs at least one run folder")
    folders = [Path(p).expanduser().resolve() for p in paths]
    labels = [f.name for f in folders]
    if len(set(labels)) < len(labels):  # a/run and b/run: the shortest paths that tell them apart
        common = Path(os.path.commonpath([str(f) for f in folders]))
        labels = [f.relative_to(common).as_posix() or f.name for f in folders]
    return [load_run(p, label) for p, label in zip(paths, labels)]


def main_metric(run: RunRecord) -> str:
    """``test_perplexity`` for causal LM runs, ``test_accuracy`` otherwise (summary.json's ``metric``)."""
    metric = (run.summary or {}).get("metric") or ("perplexity" if run.task == "causal_lm" else "accuracy")
    return f"test_{metric}"


def final_values(run: RunRecord) -> dict[str, Any]:
    """The row's numbers: final ``test_*`` metrics, bytes, wall time, rounds and status."""
    last = run.records[-1] if run.records else {}
    if run.summary is not None:
        s = run.summary
        finals = {k: v for k, v in (s.get("final") or {}).items() if k.startswith("test_")}
        status = "stopped" if s.get("stop_reason") else "finished"
        out = {"status": status, "rounds": s.get("rounds"), "bytes_up": s.get("bytes_up_total"),
               "bytes_down": s.get("bytes_down_total"), "wall_s": s.get("wall_s")}
    else:
        evaluated = [r for r in run.records if any(k.startswith("test_") for k in r)]
        finals = {k: v for k, v in (evaluated[-1] if evaluated else {}).items() if k.startswith("test_")}
        out = {"status": "unfinished", "rounds": last.get("round"), "bytes_up": last.get("bytes_up_total"),
               "bytes_down": last.get("bytes_down_total"), "wall_s": last.get("wall_s")}
    return {**out, **finals}


def schema_defaults() -> dict[str, Any]:
    """Today's default config, flattened: what a key an older run's config.yaml lacks stood for."""
    from fedfm.config import RunConfig, to_dict

    return flatten(to_dict(RunConfig()))


def differing_keys(runs: list[RunRecord]) -> list[str]:
    """Flattened config keys whose values are not the same in every run (a key a run lacks counts)."""
    def value(run: RunRecord, key: str) -> str:
        return json.dumps(run.config[key], sort_keys=True, default=str) if key in run.config else "<missing>"

    keys = sorted({k for run in runs for k in run.config} - set(SKIPPED_KEYS))
    return [k for k in keys if len({value(run, k) for run in runs}) > 1]


@dataclass
class Comparison:
    runs: list[RunRecord]
    metrics: list[str]  # the test_* columns, the main metric first
    rows: list[dict[str, Any]]  # per run: label, status, rounds, metrics, bytes, wall_s, differing keys
    keys: list[str]  # the config keys that differ


def compare_runs(paths: list[str]) -> Comparison:
    runs = load_runs(paths)
    finals = [final_values(run) for run in runs]
    mains = list(dict.fromkeys(main_metric(run) for run in runs))
    others = sorted({k for f in finals for k in f if k.startswith("test_")} - set(mains))
    metrics = mains + others
    keys = differing_keys(runs)
    rows = [{"run": run.label, **f, **{k: run.config.get(k, "-") for k in keys}} for run, f in zip(runs, finals)]
    return Comparison(runs, metrics, rows, keys)


def _number(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _megabytes(value: Any) -> str:
    return "-" if value is None else f"{value / 1e6:.2f} MB"


def _shown(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def render_table(c: Comparison):
    """The rich table: one row per run."""
    from rich.table import Table

    table = Table(title=f"{len(c.rows)} run(s)", title_justify="left")
    table.add_column("run", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("rounds", justify="right", no_wrap=True)
    for m in c.metrics:
        table.add_column(m.removeprefix("test_").replace("_", " "), justify="right", no_wrap=True)
    table.add_column("up", justify="right", no_wrap=True)
    table.add_column("down", justify="right", no_wrap=True)
    table.add_column("wall", justify="right", no_wrap=True)
    for k in c.keys:
        table.add_column(k, overflow="fold", style="cyan", min_width=min(len(k), 12))
    for row in c.rows:
        table.add_row(
            row["run"], row["status"], _number(row["rounds"]),
            *[_number(row.get(m)) for m in c.metrics],
            _megabytes(row["bytes_up"]), _megabytes(row["bytes_down"]),
            "-" if row["wall_s"] is None else f"{row['wall_s']:.1f} s",
            *[_shown(row[k]) for k in c.keys],
        )
    if not c.keys:
        table.caption = "configs identical (besides out)"
    return table


def resolve_metric(runs: list[RunRecord], name: str | None) -> str:
    """The metrics.jsonl key to plot: ``name`` as given or with ``test_`` before it; default the main metric."""
    if name is None:
        return main_metric(runs[0])
    present = {k for run in runs for r in run.records for k, v in r.items() if isinstance(v, (int, float))}
    for key in (name, f"test_{name}"):
        if key in present:
            return key
    shown = ", ".join(sorted(present - {"round", "version"})) or "none"
    raise FedfmError(f"no run logged a metric '{name}' in metrics.jsonl; numeric keys: {shown}")


def plot_runs(runs: list[RunRecord], metric: str, path: Path) -> Path:
    """One PNG (1200 x 450): ``metric`` per round and per cumulative uploaded MB, one curve per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (by_round, by_bytes) = plt.subplots(1, 2, figsize=FIGSIZE, dpi=DPI)
    for run in runs:
        points = [r for r in run.records if isinstance(r.get(metric), (int, float))]
        label = run.label if run.finished else f"{run.label} (unfinished)"
        style = "o-" if run.finished else "o--"
        rounds = [r["round"] for r in points]
        values = [r[metric] for r in points]
        by_round.plot(rounds, values, style, markersize=3, label=label)
        by_bytes.plot([(r.get("bytes_up_total") or 0) / 1e6 for r in points], values, style, markersize=3, label=label)
    for ax, xlabel in ((by_round, "round"), (by_bytes, "uploaded (MB, cumulative)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric)
        if "perplexity" in metric:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    by_round.xaxis.set_major_locator(MaxNLocator(integer=True))
    by_round.set_title(f"{metric} per round")
    by_bytes.set_title(f"{metric} per uploaded MB")
    fig.tight_layout()
    path = Path(path).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=DPI)
    except OSError as err:
        raise FedfmError(f"cannot write the plot {path}: {err.strerror or err}") from None
    finally:
        plt.close(fig)
    return path
