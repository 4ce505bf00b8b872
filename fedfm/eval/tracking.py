"""Optional experiment tracking: every round's metrics and the resolved config, also in TensorBoard or MLflow.

``tracking.kind`` (:class:`fedfm.config.schema.TrackingConfig`) picks the tracker;
``none`` (the default) logs to the run folder's files only. A tracker is a small
object with ``log_config(config)``, ``log_round(record)`` and ``close()``;
:class:`fedfm.eval.report.MetricsLog` hands it every record it writes to
metrics.jsonl, so the tracker sees exactly the file's numbers:

* every finite number in a record is one scalar at step ``record["round"]``;
  nested mappings are flattened with ``/`` (``per_client/3``,
  ``task_accuracy/sport``); lists (the cohort), flags and missing values
  (``null``) are skipped;
* ``tensorboard``: torch's ``SummaryWriter`` into ``RUN_DIR/tensorboard`` (or
  ``tracking.dir/<run folder name>``, so one ``tensorboard --logdir DIR`` shows
  many runs); the config as a text entry. A resumed run purges the steps it
  runs again (``purge_step``).
* ``mlflow``: an ``MlflowClient`` on a local SQLite store, ``RUN_DIR/mlruns/mlflow.db``
  with the artifacts beside it (or ``tracking.dir``'s, shared by many runs, or any
  ``tracking.uri``); no server. The config is logged flattened as parameters
  and whole as the artifact ``config.yaml``; the MLflow run carries the fedfm
  run id (tag ``fedfm.run_id``), so a resumed run continues the same MLflow run
  (a metric's history is append-only there: a round run again has two points).
  (MLflow 3 keeps its plain-folder store only behind an opt-out flag; SQLite is
  its recommended local store.)

Both packages are optional (``pip install 'fedfm[tracking]'``): a missing one
is a one-line error with the install command, raised by :func:`check_tracking`
before anything is built.
"""

from __future__ import annotations

import importlib
import logging
import math
import re
import time
from pathlib import Path
from typing import Any, Protocol

from fedfm.config import RunConfig, to_dict
from fedfm.eval.compare import flatten
from fedfm.errors import FedfmError
from fedfm.run_folder import run_id

PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}  # tracking.kind -> the package it needs
_MLFLOW_KEY = re.compile(r"[^\w./\- :]")  # characters MLflow refuses in metric and parameter names
_MLFLOW_PARAM_CHARS = 500  # the smallest parameter value limit across MLflow versions


class Tracker(Protocol):
    def log_config(self, config: dict) -> None: ...

    def log_round(self, record: dict) -> None: ...

    def close(self) -> None: ...


def check_tracking(cfg: RunConfig) -> None:
    """Refuse, with the install command, a tracker whose package is not installed."""
    kind = cfg.tracking.kind
    if kind == "none":
        return
    package = PACKAGES[kind]
    try:
        importlib.import_module(package)
    except ImportError as err:
        raise FedfmError(
            f"tracking.kind={kind} needs the '{package}' package ({err}): "
            f"pip install {package}  (or pip install 'fedfm[tracking]')"
        ) from None


def scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a metrics record, nested mappings flattened with ``/`` (``round`` is the step)."""
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(scalars(value, f"{name}/"))
        elif isinstance(value, bool) or value is None or (not prefix and key == "round"):
            continue
        elif isinstance(value, (int, float)) and math.isfinite(value):
            out[name] = float(value)
    return out


def config_yaml(config: dict) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=False)


class TensorBoardTracker:
    """torch.utils.tensorboard's ``SummaryWriter``: one scalar per metric per round, the config as text."""

    def __init__(self, log_dir: Path, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = log_dir
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
        self._config_step = purge_step or 0  # a resumed run's config stands at its first new step

    def log_config(self, config: dict) -> None:
        text = "\n".join("    " + line for line in config_yaml(config).splitlines())  # a markdown code block
        self.writer.add_text("config", text, global_step=self._config_step)
        self.writer.flush()

    def log_round(self, record: dict) -> None:
        step = int(record["round"])
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()  # a killed run keeps every round it logged

    def close(self) -> None:
        self.writer.close()


class MlflowTracker:
    """An MLflow run through ``MlflowClient`` (no global active run): metrics per round, the config as params."""

    def __init__(self, uri: str, experiment: str, run_name: str, fedfm_run_id: str | None,
                 artifact_location: str | None = None) -> None:
        for name in ("mlflow", "alembic"):  # their INFO lines (database creation) would interleave the progress
            logging.getLogger(name).setLevel(logging.WARNING)
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.uri = uri
        found = self.client.get_experiment_by_name(experiment)
        exp_id = found.experiment_id if found is not None else self.client.create_experiment(
            experiment, artifact_location=artifact_location)
        existing = []
        if fedfm_run_id is not None:
            existing = self.client.search_runs([exp_id], f"tags.`fedfm.run_id` = '{fedfm_run_id}'", max_results=1)
        self.resumed = bool(existing)
        if self.resumed:  # the same fedfm run, resumed: continue its MLflow run
            self.run_id = existing[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            tags = {"fedfm.run_id": fedfm_run_id} if fedfm_run_id is not None else {}
            self.run_id = self.client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id

    def log_config(self, config: dict) -> None:
        from mlflow.entities import Param

        if not self.resumed:  # parameters are write-once in MLflow; a resume replaces the artifact only
            params = [Param(_MLFLOW_KEY.sub("_", k), _param_text(v)) for k, v in flatten(config).items()]
            self.client.log_batch(self.run_id, params=params)
        self.client.log_text(self.run_id, config_yaml(config), "config.yaml")

    def log_round(self, record: dict) -> None:
        from mlflow.entities import Metric

        step, now = int(record["round"]), int(time.time() * 1000)
        metrics = [Metric(_MLFLOW_KEY.sub("_", k), v, now, step) for k, v in scalars(record).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED")


def _param_text(value: Any) -> str:
    text = value if isinstance(value, str) else "null" if value is None else str(value)
    return text if len(text) <= _MLFLOW_PARAM_CHARS else text[: _MLFLOW_PARAM_CHARS - 3] + "..."


def open_tracker(cfg: RunConfig, run_dir: Path, resumed: bool = False, first_round: int = 0) -> Tracker | None:
    """The run's tracker with its config logged, or None (``tracking.kind=none``).

    ``resumed``: the run continues from a checkpoint at round ``first_round - 1``
    (TensorBoard purges the later steps a killed run had logged).
    """
    tc = cfg.tracking
    if tc.kind == "none":
        return None
    check_tracking(cfg)
    run_dir = Path(run_dir)
    if tc.kind == "tensorboard":
        log_dir = run_dir / "tensorboard" if tc.dir is None else Path(tc.dir).expanduser() / run_dir.name
        tracker: Tracker = TensorBoardTracker(log_dir, purge_step=first_round if resumed else None)
    else:
        uri, artifacts = tc.uri, None
        if uri is None:  # a local SQLite store in a folder, artifacts beside it
            folder = (run_dir / "mlruns" if tc.dir is None else Path(tc.dir).expanduser()).resolve()
            folder.mkdir(parents=True, exist_ok=True)
            uri, artifacts = f"sqlite:///{folder / 'mlflow.db'}", (folder / "artifacts").as_uri()
        try:
            tracker = MlflowTracker(uri, tc.experiment, run_dir.name, run_id(run_dir), artifacts)
        except FedfmError:
            raise
        except Exception as err:  # an unreachable URI, a database of another MLflow version
            raise FedfmError(f"tracking.kind=mlflow: cannot open the MLflow store {uri}: "
                             f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    tracker.log_config(to_dict(cfg))
    return tracker
