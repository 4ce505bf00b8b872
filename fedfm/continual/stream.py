"""Per-client data streams: which examples each stage of a continual run reveals.

A continual run cuts every client's shard (its partition, as in a one-shot run)
into stages. Stage ``k`` reveals to each client the part of its shard that
belongs to stage ``k``; the global held-out test set is cut the same way, so
task ``k`` has its own test rows.

* ``stream=tasks`` (task-incremental / class-incremental arrival): an example
  belongs to the task that names it -- its label name for labelled data, else
  its group up to the first ``:`` (the play of a Shakespeare ``play:role``).
  Examples that no task names are never revealed.
* ``stream=windows`` (arrival over time): the dataset order is the time order;
  each client's shard, in that order, is cut into ``num_windows`` consecutive
  windows of near-equal size, and so is the global test set.
* ``stream=windows`` with ``time_column``: the time is that column's value
  (a number or a date, :mod:`fedfm.data.times`), not the file order. Stage
  ``k`` holds the rows with ``edge[k-1] <= t < edge[k]`` (the last stage also
  its right end): the edges are ``continual.time_boundaries``, or else cut
  ``[min t, max t]`` of the whole dataset into ``num_windows`` equal-width time
  windows. Every client and the test set use the same edges, so a stage is one
  real period of time for everyone (its size varies with the traffic in it).

A plan's :attr:`StreamPlan.rule` is all a client needs to cut its own rows the
same way (:func:`client_stages`): a deployed node does it on its own data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedfm.data.times import as_seconds, format_time, is_date, parse_time
from fedfm.errors import FedfmError


@dataclass
class StreamPlan:
    """What each stage reveals: ``train[k][c]`` (client ``c``'s new rows) and ``test[k]`` (task ``k``'s test rows)."""

    names: list[str]  # one display name per stage ("business+tech", "window 2")
    train: list[list[np.ndarray]]  # [stage][client] -> sorted row indices
    test: list[np.ndarray]  # [stage] -> sorted global test row indices
    tasks: list[list[str]] | None = None  # stream=tasks: the names each stage reveals (None: windows)
    time_edges: list[float] | None = None  # windows by time_column: the inner stage boundaries (as numbers)

    @property
    def rule(self) -> dict:
        """How a client cuts its own rows into the stages (:func:`client_stages`), as JSON."""
        if self.tasks is not None:
            return {"tasks": self.tasks}
        return {"time_edges": self.time_edges} if self.time_edges is not None else {"windows": self.num_stages}

    @property
    def num_stages(self) -> int:
        return len(self.names)


def task_names_of(ds) -> list[str]:
    """The task name of every example: its label name, else its group up to the first ':'."""
    if ds.labels is not None and ds.label_names is not None:
        return [ds.label_names[int(y)] for y in ds.labels]
    if ds.groups is not None:
        return [g.split(":", 1)[0] for g in ds.groups]
    raise FedfmError(
        "continual.stream=tasks needs labels or groups (data.label_column or data.group_column); "
        "use continual.stream=windows for unlabelled, ungrouped data"
    )


def default_tasks(names: list[str]) -> list[list[str]]:
    """Two names per task in order; with an odd count the last name is a task of its own.

    BBC News (business, entertainment, politics, sports, tech) ->
    ``[[business, entertainment], [politics, sports], [tech]]``. (A one-label
    *first* task is avoided on purpose: training on a single class saturates the
    head and leaves the model unable to learn the next task.)
    """
    return [list(names[i : i + 2]) for i in range(0, len(names), 2)]


def ordered_names(ds, per_example: list[str]) -> list[str]:
    """Distinct task names: label-id order for labels, first appearance for groups."""
    if ds.labels is not None and ds.label_names is not None:
        return list(ds.label_names)
    return list(dict.fromkeys(per_example))


def plan_tasks(ds, shards: list[np.ndarray], test_idx: np.ndarray, tasks: list[list[str]] | None) -> StreamPlan:
    """Stages by task: stage ``k`` reveals each client's rows whose task name is in ``tasks[k]``."""
    per_example = task_names_of(ds)
    known = ordered_names(ds, per_example)
    tasks = default_tasks(known) if tasks is None else [list(t) for t in tasks]
    unknown = [n for t in tasks for n in t if n not in known]
    if unknown:
        shown = ", ".join(known[:20]) + (" ..." if len(known) > 20 else "")
        raise FedfmError(f"continual.tasks names {', '.join(unknown)}, not in the dataset (it has: {shown})")
    stage = stage_of_examples(per_example, tasks)
    train = _by_stage([split_by_task(stage, s, len(tasks)) for s in shards], len(tasks))
    test = split_by_task(stage, test_idx, len(tasks))
    for k, rows in enumerate(test):
        if len(rows) == 0:
            raise FedfmError(f"continual task {'+'.join(tasks[k])} has no held-out test examples (raise data.test_fraction)")
    return StreamPlan(names=["+".join(t) for t in tasks], train=train, test=test, tasks=tasks)


def stage_of_examples(per_example: list[str], tasks: list[list[str]]) -> np.ndarray:
    """The stage of every example: the task naming its task name (-1: none does, never revealed)."""
    stage_of = {n: k for k, t in enumerate(tasks) for n in t}
    return np.array([stage_of.get(n, -1) for n in per_example], dtype=np.int64)


def split_by_task(stage: np.ndarray, rows: np.ndarray, num_stages: int) -> list[np.ndarray]:
    """``rows`` cut by ``stage`` (of every example): the sorted rows of each stage."""
    rows = np.asarray(rows, dtype=np.int64)
    return [np.sort(rows[stage[rows] == k]) for k in range(num_stages)]


def split_by_window(rows: np.ndarray, num_windows: int) -> list[np.ndarray]:
    """``rows`` in dataset order cut into ``num_windows`` consecutive windows of near-equal size."""
    return [np.sort(w) for w in np.array_split(np.sort(np.asarray(rows, dtype=np.int64)), num_windows)]


def _by_stage(per_client: list[list[np.ndarray]], num_stages: int) -> list[list[np.ndarray]]:
    """``[client][stage]`` -> ``[stage][client]``."""
    return [[rows[k] for rows in per_client] for k in range(num_stages)]


def plan_windows(shards: list[np.ndarray], test_idx: np.ndarray, num_windows: int) -> StreamPlan:
    """Stages by time: each client's shard and the test set, in dataset order, cut into consecutive windows."""
    test = split_by_window(test_idx, num_windows)
    if any(len(w) == 0 for w in test):
        raise FedfmError(f"continual.num_windows={num_windows} exceeds the {len(test_idx)} held-out test examples")
    train = _by_stage([split_by_window(s, num_windows) for s in shards], num_windows)
    return StreamPlan(names=[f"window {k}" for k in range(num_windows)], train=train, test=test)


def _times_of(ds) -> np.ndarray:
    if getattr(ds, "times", None) is None:
        raise FedfmError("a time-cut stream needs the dataset's time column (continual.time_column)")
    return ds.times


def time_edges(times: np.ndarray, num_windows: int, boundaries, column: str) -> list[float]:
    """The inner stage edges (as :func:`fedfm.data.times.as_seconds` numbers).

    ``boundaries`` (numbers for a numeric column, dates for a date column, increasing),
    or else ``num_windows`` equal-width windows over ``[min t, max t]``.
    """
    date = is_date(times)
    t = as_seconds(times)
    if boundaries is None:
        lo, hi = float(t.min()), float(t.max())
        if hi <= lo:
            raise FedfmError(f"continual.time_column '{column}' has a single value ({format_time(lo, date)}): "
                             "no time span to cut into stages")
        return [lo + (hi - lo) * k / num_windows for k in range(1, num_windows)]
    want = "date" if date else "number"
    edges = []
    for b in boundaries:
        parsed = parse_time(b)
        if parsed is None or parsed[1] != want:
            raise FedfmError(f"continual.time_boundaries: {b!r} is not a {want} like the values of "
                             f"time column '{column}'")
        edges.append(parsed[0])
    if any(b <= a for a, b in zip(edges, edges[1:])):
        raise FedfmError(f"continual.time_boundaries must increase strictly, got {list(boundaries)}")
    return edges


def stage_of_times(times: np.ndarray, edges) -> np.ndarray:
    """The stage of every time: ``k`` with ``edges[k-1] <= t < edges[k]`` (0 before the first, last after the last)."""
    return np.searchsorted(np.asarray(edges, dtype=np.float64), np.asarray(times, dtype=np.float64), side="right")


def plan_times(ds, shards: list[np.ndarray], test_idx: np.ndarray, num_windows: int, boundaries,
               column: str) -> StreamPlan:
    """Stages by real time: every shard and the test set cut at the same time edges (:func:`time_edges`)."""
    times = _times_of(ds)
    edges = time_edges(times, num_windows, boundaries, column)
    seconds = as_seconds(times)
    stage = stage_of_times(seconds, edges)
    n = len(edges) + 1
    bounds = [float(seconds.min()), *edges, float(seconds.max())]
    names = [f"{format_time(bounds[k], is_date(times))}..{format_time(bounds[k + 1], is_date(times))}"
             for k in range(n)]
    test = split_by_task(stage, test_idx, n)
    for k, rows in enumerate(test):
        if len(rows) == 0:
            raise FedfmError(f"continual time window {names[k]} has no held-out test examples "
                             "(set continual.time_boundaries, fewer num_windows, or raise data.test_fraction)")
    train = _by_stage([split_by_task(stage, s, n) for s in shards], n)
    return StreamPlan(names=names, train=train, test=test, time_edges=list(edges))


def client_stages(rule: dict, ds, shard: np.ndarray) -> list[np.ndarray]:
    """One client's new rows in every stage, cut from its own ``shard`` of ``ds`` by a plan's :attr:`StreamPlan.rule`.

    The same cut :func:`plan_stream` makes of every shard: a deployed node applies it
    to its own rows (the task names come from the server, so the stages agree).
    """
    if "tasks" in rule:
        tasks = rule["tasks"]
        return split_by_task(stage_of_examples(task_names_of(ds), tasks), shard, len(tasks))
    if "time_edges" in rule:
        edges = rule["time_edges"]
        return split_by_task(stage_of_times(as_seconds(_times_of(ds)), edges), shard, len(edges) + 1)
    return split_by_window(shard, int(rule["windows"]))


def plan_stream(cfg, ds, shards: list[np.ndarray], test_idx: np.ndarray) -> StreamPlan:
    """The plan ``cfg`` (a ``ContinualConfig``) asks for; refuses a stage in which no client gets data."""
    if cfg.stream == "tasks":
        plan = plan_tasks(ds, shards, test_idx, cfg.tasks)
    elif getattr(cfg, "time_column", None) is not None:
        plan = plan_times(ds, shards, test_idx, cfg.num_windows, cfg.time_boundaries, cfg.time_column)
    else:
        plan = plan_windows(shards, test_idx, cfg.num_windows)
    for k, parts in enumerate(plan.train):
        if shards and sum(len(p) for p in parts) == 0:  # (a deployed server holds no shard: only the test cut)
            raise FedfmError(f"continual stage {k} ({plan.names[k]}) reveals no training example to any client")
    return plan
