"""Per-user studies read true (issue 15, point 9).

A chat-like JSONL split by user: the majority-class baseline beside accuracy,
the client -> users map, fairness statistics that leave out clients with too
few local test rows, the client test cap, plain progress lines off a terminal,
and continual stages cut by a time column. Tiny random-init models, small files.
"""

import json
import random
import re

import numpy as np
import pytest
from typer.testing import CliRunner

import fedfm
from fedfm.build import build_clients
from fedfm.cli import app
from fedfm.config import load_config
from fedfm.continual.stream import plan_stream
from fedfm.data.partition import cap_test_rows
from fedfm.data.sources import load_text_dataset
from fedfm.eval.fairness import client_stats, fairness_stats

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = {
    "sport": "goal match striker coach league penalty keeper referee stadium season".split(),
    "tech": "software chip laptop network server browser robot code cloud phone".split(),
    "food": "bread cheese recipe oven garlic pasta butter salad sugar soup".split(),
}
SHARED = "the a of and today new report people year said".split()
# rows per user: three users with a handful of rows get 1 local test row each (client_test_fraction 0.2)
USERS = {"ann": 80, "bob": 50, "cy": 40, "dee": 40, "eve": 30, "fay": 4, "gus": 3, "hal": 3}
LABEL_CYCLE = ["sport", "sport", "sport", "tech", "food"]  # 60% sport: the majority class


def write_chat_jsonl(path, seed=0):
    """One message per line: text, topic label, user id and a day; returns the rows written."""
    rng = random.Random(seed)
    rows, i = [], 0
    for user, n in USERS.items():
        for _ in range(n):
            label = LABEL_CYCLE[i % len(LABEL_CYCLE)]
            words = rng.choices(VOCAB[label], k=6) + rng.choices(SHARED, k=6)
            rows.append({"message": " ".join(words), "topic": label, "user": user, "day": f"2024-01-{1 + i % 30:02d}",
                         "step": i % 10})
            i += 1
    rng.shuffle(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def overrides(tmp_path, data, **extra):
    base = {
        "model.name": "tiny-bert",
        "model.method": "full",
        "model.max_length": 16,
        "data.dataset": str(data),
        "data.text_column": "message",
        "data.label_column": "topic",
        "data.group_column": "user",
        "federation.partition.scheme": "natural",
        "federation.num_clients": len(USERS),
        "federation.clients_per_round": 3,
        "federation.rounds": 3,
        "train.local_steps": 2,
        "eval.every": 0,
        "progress": False,
        "out": str(tmp_path / "run"),
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def built(args):
    """The run's config, dataset and clients as a run builds them (no model)."""
    cfg = load_config(None, args)
    ds = load_text_dataset(cfg.data, cfg.model.task, seed=cfg.seed)
    test_idx, clients, stats = build_clients(cfg, ds)
    return cfg, ds, test_idx, clients, stats


# ----------------------------------------------------------------------------- fairness statistics


def test_median_and_minimum_test_size_against_hand_values():
    values = {0: 1.0, 1: 0.0, 2: 0.8, 3: 0.6, 4: 0.9, 5: 0.7}
    sizes = {0: 1, 1: 2, 2: 10, 3: 5, 4: 20, 5: 7}
    s = client_stats(values, sizes, min_test=5)
    # clients 0 and 1 (1 and 2 test rows) are left out: [0.8, 0.6, 0.9, 0.7] remain
    assert s["counted"] == 4 and s["too_small"] == 2
    assert s["mean"] == pytest.approx(0.75)
    assert s["median"] == pytest.approx(0.75)  # (0.7 + 0.8) / 2
    assert s["worst10"] == pytest.approx(0.6)  # ceil(0.1 * 4) = 1 client: the lowest
    assert s["std"] == pytest.approx(np.sqrt((0.05**2 + 0.15**2 + 0.15**2 + 0.05**2) / 4))
    assert (s["min"], s["max"]) == (pytest.approx(0.6), pytest.approx(0.9))
    # without the filter the two chance clients decide worst 10% and min
    s1 = client_stats(values, sizes, min_test=1)
    assert s1["counted"] == 6 and s1["too_small"] == 0
    assert s1["median"] == pytest.approx(0.75) and s1["worst10"] == 0.0 and s1["min"] == 0.0
    # odd count: the middle value; lower is better (perplexity): worst 10% are the highest
    assert fairness_stats(np.array([3.0, 1.0, 2.0]))["median"] == 2.0
    assert fairness_stats(np.array([10.0, 30.0, 20.0]), higher_is_better=False)["worst10"] == 30.0
    # nobody qualifies: counts only
    assert client_stats({0: 1.0}, {0: 1}, min_test=5) == {"counted": 0, "too_small": 1}


def test_client_test_cap_trims_the_largest_first():
    parts = [np.arange(2), np.arange(100, 110), np.arange(200, 230), np.arange(300, 305)]
    capped = cap_test_rows(parts, cap=20, seed=0)
    # t=5 would use 2+5+5+5=17 <= 20, t=10 uses 27 > 20: clients of 2 and 5 kept whole,
    # the other two share the 13 rows left: 6 each
    assert [len(c) for c in capped] == [2, 6, 6, 5]
    for before, after in zip(parts, capped):
        assert set(after) <= set(before) and list(after) == sorted(after)
    assert all(np.array_equal(a, b) for a, b in zip(cap_test_rows(parts, cap=47, seed=0), parts))  # fits: unchanged


def test_max_test_examples_caps_global_and_client_test_sets(tmp_path):
    write_chat_jsonl(tmp_path / "chat.jsonl")
    args = overrides(tmp_path, tmp_path / "chat.jsonl", **{"data.client_test_fraction": 0.5})
    _, _, test_full, clients_full, _ = built(args)
    full = [len(c.test_idx) for c in clients_full]
    assert sum(full) > 30 and len(test_full) > 30
    _, _, test_idx, clients, _ = built(args + ["eval.max_test_examples=30"])
    sizes = [len(c.test_idx) for c in clients]
    assert len(test_idx) == 30 and sum(sizes) <= 30
    t = max(sizes)
    # the largest clients are trimmed to the same size t; the small ones keep all their rows
    assert all(s == min(f, t) for s, f in zip(sizes, full)), (sizes, full)
    for c, cf in zip(clients, clients_full):
        assert set(c.test_idx) <= set(cf.test_idx)
        assert np.array_equal(c.train_idx, cf.train_idx)  # training rows untouched


# ----------------------------------------------------------------------------- a per-user run


def test_per_user_run_prior_groups_and_fairness(tmp_path, capsys):
    rows = write_chat_jsonl(tmp_path / "chat.jsonl")
    args = overrides(tmp_path, tmp_path / "chat.jsonl", progress=True)
    summary = fedfm.run(None, args)
    out = tmp_path / "run"

    # progress off a terminal: one plain line per round (rounds 1-2 train only, round 3 evaluated)
    printed = capsys.readouterr().out
    assert "round   1/3 | train loss" in printed and "round   2/3 | train loss" in printed
    assert "round   3 | test accuracy" in printed and "prior 0.6000" in printed
    assert re.search(r"majority-class baseline\s*│\s*0.6000", printed), printed

    cfg, ds, test_idx, clients, _ = built(args)
    labels = ds.labels
    train = np.concatenate([c.train_idx for c in clients])
    majority = int(np.argmax(np.bincount(labels[train])))
    assert ds.label_names[majority] == "sport"
    # 60% of the 250 rows are sport; the stratified 50-row test set holds 30 of them
    assert len(test_idx) == 50 and int((labels[test_idx] == majority).sum()) == 30
    assert summary["prior_accuracy"] == pytest.approx(0.6)
    assert summary["final"]["test_prior_accuracy"] == pytest.approx(0.6)

    # partition.json: each client index -> the one user it holds (as many clients as users: sorted order)
    part = json.loads((out / "partition.json").read_text())
    assert part["client_groups"] == {str(i): [u] for i, u in enumerate(sorted(USERS))}
    for c in clients:  # and the rows behind it belong to that user
        assert {ds.groups[i] for i in np.concatenate([c.train_idx, c.test_idx])} == set(part["client_groups"][str(c.cid)])
    assert {r["user"] for r in rows} == {u for us in part["client_groups"].values() for u in us}

    # per-client metrics name their users; clients with < 5 local test rows are left out and counted
    sizes = {str(c.cid): len(c.test_idx) for c in clients}
    per = summary["per_client"]
    assert {cid: p["groups"] for cid, p in per.items()} == {cid: part["client_groups"][cid] for cid in per}
    small = [cid for cid in per if sizes[cid] < 5]
    assert sorted(part["client_groups"][cid][0] for cid in small) == ["fay", "gus", "hal"]
    assert summary["clients_too_small"] == 3 and summary["clients_counted"] == len(per) - 3
    kept = np.array([per[cid]["accuracy"] for cid in per if sizes[cid] >= 5])
    fin = summary["final"]
    assert fin["client_accuracy_mean"] == pytest.approx(kept.mean())
    assert fin["client_accuracy_median"] == pytest.approx(np.median(kept))
    assert fin["client_accuracy_min"] == pytest.approx(kept.min())
    prior_clients = [np.mean(labels[c.test_idx] == majority) for c in clients if len(c.test_idx) >= 5]
    assert fin["client_prior_accuracy_mean"] == pytest.approx(np.mean(prior_clients))
    assert (out / "metrics.png").stat().st_size > 0


def test_fewer_clients_than_users_keep_whole_users(tmp_path):
    write_chat_jsonl(tmp_path / "chat.jsonl")
    _, ds, _, clients, stats = built(overrides(tmp_path, tmp_path / "chat.jsonl", **{"federation.num_clients": 3}))
    groups = stats["client_groups"]
    assert sorted(u for us in groups.values() for u in us) == sorted(USERS)  # every user on exactly one client
    for c in clients:
        assert {ds.groups[i] for i in np.concatenate([c.train_idx, c.test_idx])} == set(groups[str(c.cid)])


def test_no_group_map_without_a_natural_partition(tmp_path):
    write_chat_jsonl(tmp_path / "chat.jsonl")
    *_, stats = built(overrides(tmp_path, tmp_path / "chat.jsonl", **{"federation.partition.scheme": "iid"}))
    assert "client_groups" not in stats


# ----------------------------------------------------------------------------- continual by time


def continual_args(tmp_path, data, **extra):
    return overrides(tmp_path, data, **{"federation.partition.scheme": "iid", "federation.num_clients": 3,
                                        "continual.enabled": True, "continual.stream": "windows", **extra})


def stage_rows(ds, rows, edges_of):
    """Hand cut: row -> stage by comparing its value to the boundaries."""
    return [sorted(int(i) for i in rows if edges_of(i) == k) for k in range(3)]


def test_time_column_cuts_stages_at_time_boundaries(tmp_path):
    rows = write_chat_jsonl(tmp_path / "chat.jsonl")
    # dates, explicit boundaries: [.., Jan 11), [Jan 11, Jan 21), [Jan 21, ..]
    args = continual_args(tmp_path, tmp_path / "chat.jsonl", **{"continual.time_column": "day",
                                                                  "continual.time_boundaries": "[2024-01-11, 2024-01-21]"})
    cfg = load_config(None, args)
    ds = load_text_dataset(cfg.data, cfg.model.task, seed=cfg.seed, time_column="day")
    _, _, test_idx, clients, _ = built(args)
    plan = plan_stream(cfg.continual, ds, [c.train_idx for c in clients], test_idx)
    days = [int(r["day"][-2:]) for r in rows]  # the file's order is the dataset's order
    stage = lambda i: 0 if days[i] < 11 else (1 if days[i] < 21 else 2)  # noqa: E731
    assert plan.num_stages == 3 and plan.names[1] == "2024-01-11..2024-01-21"
    for k in range(3):
        assert plan.test[k].tolist() == stage_rows(ds, test_idx, stage)[k]
        for c, got in zip(clients, plan.train[k]):
            assert got.tolist() == stage_rows(ds, c.train_idx, stage)[k]
    assert plan.rule == {"time_edges": plan.time_edges}

    # numbers, equal-width windows over [0, 9]: edges 3 and 6
    args = continual_args(tmp_path, tmp_path / "chat.jsonl", **{"continual.time_column": "step",
                                                                  "continual.num_windows": 3})
    cfg = load_config(None, args)
    ds = load_text_dataset(cfg.data, cfg.model.task, seed=cfg.seed, time_column="step")
    plan = plan_stream(cfg.continual, ds, [c.train_idx for c in clients], test_idx)
    assert plan.time_edges == [3.0, 6.0]
    steps = [r["step"] for r in rows]
    stage = lambda i: 0 if steps[i] < 3 else (1 if steps[i] < 6 else 2)  # noqa: E731
    for k in range(3):
        assert plan.test[k].tolist() == stage_rows(ds, test_idx, stage)[k]


def test_time_cut_continual_run_end_to_end(tmp_path):
    write_chat_jsonl(tmp_path / "chat.jsonl")
    summary = fedfm.run(None, continual_args(tmp_path, tmp_path / "chat.jsonl", **{
        "continual.time_column": "day", "continual.num_windows": 2, "federation.rounds": 1}))
    assert summary["continual"]["stages"] == ["2024-01-01..2024-01-15T12:00:00", "2024-01-15T12:00:00..2024-01-30"]


runner = CliRunner()


@pytest.mark.parametrize("column, content, fragment", [
    ("when", None, "continual.time_column 'when' not in"),
    ("message", None, "neither a number nor a date"),
    ("day", '{"message": "a b", "topic": "x", "user": "u", "day": ""}\n', "row 1 has ''"),
])
def test_bad_time_column_is_one_error_line(tmp_path, column, content, fragment):
    path = tmp_path / "chat.jsonl"
    write_chat_jsonl(path)
    if content is not None:
        path.write_text(content + path.read_text())
    args = continual_args(tmp_path, path, **{"continual.time_column": column})
    res = runner.invoke(app, ["run", *args])
    assert res.exit_code == 2, res.output
    lines = [x for x in res.output.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], res.output


def test_time_column_config_errors(tmp_path):
    from fedfm.errors import FedfmError

    with pytest.raises(FedfmError, match="continual.stream=windows"):
        load_config(None, ["continual.time_column=day"])
    with pytest.raises(FedfmError, match="needs continual.time_column"):
        load_config(None, ["continual.stream=windows", "continual.time_boundaries=[3]"])
    write_chat_jsonl(tmp_path / "chat.jsonl")
    args = continual_args(tmp_path, tmp_path / "chat.jsonl", **{"continual.time_column": "step",
                                                                  "continual.time_boundaries": "[2024-01-11]"})
    res = runner.invoke(app, ["run", *args])
    assert res.exit_code == 2 and "is not a number like the values of time column 'step'" in res.output, res.output
