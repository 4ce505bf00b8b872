"""Federated continual learning: metrics, streams, replay, regularizers, the always-on loop."""

import json
from collections import OrderedDict

import numpy as np
import pytest
import torch

from fedfm.algorithms.base import Broadcast
from fedfm.algorithms.fedprox import FedProxHook
from fedfm.config import load_config
from fedfm.continual.metrics import average_accuracy, backward_transfer, forgetting, stage_metrics
from fedfm.continual.regularizers import ComposedHook, PullToAnchorHook, diagonal_fisher
from fedfm.continual.replay import ReservoirBuffer
from fedfm.continual.stream import default_tasks, plan_stream, plan_tasks, plan_windows
from fedfm.data.sources import TextDataset
from fedfm.errors import ConfigError, FedfmError
from fedfm.models.state import load_state, state_to_bytes

pytestmark = pytest.mark.usefixtures("one_thread")


# -- metrics, checked by hand -------------------------------------------------------------------------

R_FORGET = [[0.9, None, None], [0.6, 0.8, None], [0.5, 0.7, 0.9]]
# task 0: best earlier 0.9, now 0.5 -> 0.4 forgotten; task 1: best 0.8, now 0.7 -> 0.1
# BWT: (0.5 - 0.9 + 0.7 - 0.8) / 2 = -0.25
R_RECOVER = [[0.5, None, None], [0.9, 0.6, None], [0.7, 0.8, 0.9]]
# task 0: best earlier max(0.5, 0.9) = 0.9, now 0.7 -> 0.2; task 1: best 0.6, now 0.8 -> -0.2; F = 0.0
# BWT: (0.7 - 0.5 + 0.8 - 0.6) / 2 = +0.2 (forgetting measures from the best, BWT from the first score)


def test_forgetting_and_backward_transfer_by_hand():
    assert average_accuracy(R_FORGET) == pytest.approx(0.7)
    assert forgetting(R_FORGET) == pytest.approx(0.25)
    assert backward_transfer(R_FORGET) == pytest.approx(-0.25)
    assert forgetting(R_RECOVER) == pytest.approx(0.0)
    assert backward_transfer(R_RECOVER) == pytest.approx(0.2)
    # after stage 1 only: task 0 went 0.5 -> 0.9 (gained)
    assert forgetting(R_RECOVER, 1) == pytest.approx(-0.4)
    assert backward_transfer(R_RECOVER, 1) == pytest.approx(0.4)
    assert average_accuracy(R_RECOVER, 1) == pytest.approx(0.75)
    assert forgetting(R_FORGET, 0) is None and backward_transfer(R_FORGET, 0) is None
    m = stage_metrics(R_FORGET)
    assert m["current_task_accuracy"] == 0.9 and m["forgetting"] == pytest.approx(0.25)
    with pytest.raises(ValueError):
        average_accuracy([[0.5, None], [None, 0.4]])


# -- streams ------------------------------------------------------------------------------------------

def toy_dataset():
    labels = np.array([0, 1, 2, 3, 0, 1, 2, 3, 4, 4, 0, 2])
    return TextDataset([f"t{i}" for i in range(12)], labels, ["a", "b", "c", "d", "e"], None)


def test_task_stream_reveals_exactly_the_tasks_rows():
    ds = toy_dataset()
    shards = [np.array([0, 1, 2, 3, 4]), np.array([5, 6, 7, 8])]
    test = np.array([9, 10, 11])
    plan = plan_tasks(ds, shards, np.array([1, 9, 10, 11]), [["a", "c"], ["b"], ["d", "e"]])
    assert plan.names == ["a+c", "b", "d+e"]
    expect = [[[0, 2, 4], [6]], [[1], [5]], [[3], [7, 8]]]
    for k in range(3):
        for c in range(2):
            assert plan.train[k][c].tolist() == expect[k][c]
    assert [t.tolist() for t in plan.test] == [[10, 11], [1], [9]]
    with pytest.raises(FedfmError, match="b has no held-out test"):
        plan_tasks(ds, shards, test, [["a", "c"], ["b"], ["d", "e"]])
    # labels no task names are never revealed
    plan = plan_tasks(ds, shards, np.array([10, 11]), [["a", "c"]])
    assert [p.tolist() for p in plan.train[0]] == [[0, 2, 4], [6]]
    with pytest.raises(FedfmError, match="not in the dataset"):
        plan_tasks(ds, shards, test, [["a"], ["zzz"]])


def test_default_tasks_and_groups_and_windows():
    assert default_tasks(["business", "entertainment", "politics", "sports", "tech"]) == [
        ["business", "entertainment"], ["politics", "sports"], ["tech"]]
    assert default_tasks(["a", "b", "c", "d"]) == [["a", "b"], ["c", "d"]]
    plays = TextDataset(["x"] * 6, None, None, ["ham:A", "ham:B", "lear:K", "ham:A", "lear:F", "mac:M"])
    plan = plan_tasks(plays, [np.array([0, 2, 5]), np.array([1, 3])], np.array([4, 3, 0]), [["lear"], ["ham"]])
    assert [p.tolist() for p in plan.train[0]] == [[2], []] and [p.tolist() for p in plan.train[1]] == [[0], [1, 3]]
    assert [t.tolist() for t in plan.test] == [[4], [0, 3]]
    plan = plan_windows([np.arange(10), np.array([3, 1, 2])], np.arange(20, 26), 3)
    assert [p.tolist() for p in plan.train[0]] == [[0, 1, 2, 3], [1]]
    assert [p.tolist() for p in plan.train[2]] == [[7, 8, 9], [3]]
    assert [t.tolist() for t in plan.test] == [[20, 21], [22, 23], [24, 25]]
    cfg = load_config(None, ["continual.tasks=[[a],[b]]"]).continual
    with pytest.raises(FedfmError, match="reveals no training example"):
        plan_stream(cfg, toy_dataset(), [np.array([0]), np.array([4])], np.array([1, 10]))


def test_config_refuses_overlapping_or_empty_tasks():
    with pytest.raises(ConfigError, match="more than one task"):
        load_config(None, ["continual.tasks=[[a,b],[b]]"])
    with pytest.raises(ConfigError, match="at least one"):
        load_config(None, ["continual.tasks=[[a],[]]"])


# -- replay -------------------------------------------------------------------------------------------

def test_reservoir_is_bounded_and_keeps_a_uniform_sample():
    buf = ReservoirBuffer(4, seed=0)
    buf.offer(np.array([7, 8]))
    assert sorted(buf.items.tolist()) == [7, 8]
    assert buf.training_rows(np.array([9, 7])).tolist() == [7, 8, 9]
    buf.offer(np.arange(100, 150))
    assert len(buf) == 4 and buf.seen == 52
    # Uniformity: after 20 items offered in 3 chunks, each is kept with probability 5/20.
    n, k, trials = 20, 5, 4000
    counts = np.zeros(n)
    for s in range(trials):
        b = ReservoirBuffer(k, seed=s)
        for chunk in np.split(np.arange(n), [3, 11]):
            b.offer(chunk)
        assert len(b) == k and len(set(b.items.tolist())) == k
        counts[b.items] += 1
    expected = trials * k / n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 43.8, (chi2, counts)  # chi-square, 19 degrees of freedom, p = 0.001
    # the first and the last items are not favoured (a keep-the-first buffer would fail here)
    assert abs(counts[:5].mean() - counts[-5:].mean()) < 0.1 * expected


# -- regularizers -------------------------------------------------------------------------------------

def _params():
    g = torch.Generator().manual_seed(0)
    return OrderedDict(w=torch.nn.Parameter(torch.randn(3, 2, generator=g)), b=torch.nn.Parameter(torch.randn(2, generator=g)))


@pytest.mark.parametrize("kind", ["l2", "ewc"])
def test_pull_gradient_equals_the_penalty_formula(kind):
    params = _params()
    g = torch.Generator().manual_seed(1)
    anchor = OrderedDict((k, torch.randn(p.shape, generator=g)) for k, p in params.items())
    fisher = OrderedDict((k, torch.rand(p.shape, generator=g)) for k, p in params.items()) if kind == "ewc" else None
    lam = 0.7
    hook = PullToAnchorHook(Broadcast(anchor), params, {}, anchor, lam, fisher)
    # reference: autograd of (lam/2) sum F (theta - anchor)^2
    ref = sum((0.5 * lam * (1 if fisher is None else fisher[k]) * (p - anchor[k]) ** 2).sum() for k, p in params.items())
    grads = torch.autograd.grad(ref, list(params.values()))
    assert float(hook.penalty()) == pytest.approx(ref.item(), rel=1e-6)
    data_grad = {k: torch.full_like(p, 0.25) for k, p in params.items()}
    for k, p in params.items():
        p.grad = data_grad[k].clone()
    hook.on_gradients()
    for (k, p), gr in zip(params.items(), grads):
        torch.testing.assert_close(p.grad, data_grad[k] + gr)


def test_composed_hook_adds_fedprox_and_l2():
    params = _params()
    glob = OrderedDict((k, torch.zeros_like(p)) for k, p in params.items())
    anchor = OrderedDict((k, torch.ones_like(p)) for k, p in params.items())
    b = Broadcast(glob)
    hook = ComposedHook(FedProxHook(b, params, {}, mu=0.1), PullToAnchorHook(b, params, {}, anchor, 2.0))
    for p in params.values():
        p.grad = None
    hook.on_gradients()
    for k, p in params.items():
        torch.testing.assert_close(p.grad, 0.1 * p.detach() + 2.0 * (p.detach() - 1.0))
    assert hook.finish(1, 0.1) == {}


def test_diagonal_fisher_of_the_head_bias_is_mean_squared_softmax_residual(tmp_path):
    """For cross-entropy, d loss / d bias = softmax(logits) - onehot(y), so F_bias = mean (p - y)^2."""
    from fedfm.config.schema import ModelConfig
    from fedfm.data.encode import encode, make_batch
    from fedfm.models import build_model

    fm = build_model(ModelConfig(name="tiny-bert", method="full", max_length=16), 3, seed=0)
    texts = ["goal match striker", "chip laptop code", "bread cheese oven", "the report said", "cloud phone"]
    labels = np.array([0, 1, 2, 0, 1])
    enc = encode(texts, fm.tokenizer, 16, labels)
    rows = np.arange(5)
    fisher = diagonal_fisher(fm, enc, rows)
    fm.model.eval()
    with torch.no_grad():
        residual = []
        for r in rows:  # one at a time, as padding differs per batch
            batch = make_batch(enc, torch.as_tensor([int(r)]), fm.task)
            p = torch.softmax(fm.model(**{k: v for k, v in batch.items() if k != "labels"}).logits, -1)[0]
            residual.append(p - torch.nn.functional.one_hot(torch.tensor(int(labels[r])), 3))
    expect = (torch.stack(residual) ** 2).mean(0)
    torch.testing.assert_close(fisher["classifier.bias"], expect, rtol=1e-4, atol=1e-7)
    assert set(fisher) == set(fm.params) and all((f >= 0).all() for f in fisher.values())


# -- the always-on loop, end to end -------------------------------------------------------------------

def write_topics(path, n=240, seed=0):
    rng = np.random.default_rng(seed)
    vocab = {
        "sport": "goal match striker coach league penalty".split(),
        "tech": "software chip laptop network server robot".split(),
        "food": "bread cheese recipe oven garlic pasta".split(),
        "music": "guitar album concert singer drums chorus".split(),
    }
    names = list(vocab)
    rows = ["text,label"]
    for i in range(n):
        lab = names[i % 4]
        rows.append(" ".join(rng.choice(vocab[lab], 6)) + f",{lab}")
    path.write_text("\n".join(rows) + "\n")
    return path


def continual_overrides(tmp_path, name, **extra) -> list[str]:
    base = {
        "model.name": "tiny-bert", "model.method": "full", "model.max_length": 12,
        "data.dataset": str(write_topics(tmp_path / "topics.csv")), "data.client_test_fraction": 0.0,
        "federation.num_clients": 4, "federation.clients_per_round": 2,
        "federation.partition.scheme": "iid", "train.local_steps": 3, "train.lr": 0.01,
        "eval.every": 0, "eval.clients": False, "threads": 1, "progress": False,
        "continual.enabled": True, "continual.tasks": "[[sport,tech],[food,music]]",
        "continual.rounds_per_stage": 2, "out": str(tmp_path / name),
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def tiny_continual(tmp_path, name, **extra):
    from fedfm.runner import run

    return run(None, continual_overrides(tmp_path, name, **extra))


def test_end_to_end_continual_run_writes_the_matrix_and_versions_keep_increasing(tmp_path):
    s = tiny_continual(tmp_path, "naive")
    out = tmp_path / "naive"
    for f in ("config.yaml", "metrics.jsonl", "summary.json", "final_state.safetensors", "metrics.png"):
        assert (out / f).exists(), f
    R = s["continual"]["accuracy_matrix"]
    assert len(R) == 2 and R[0][1] is None and all(v is not None for v in R[1])
    assert s["forgetting"] == pytest.approx(forgetting(R)) and s["backward_transfer"] == pytest.approx(backward_transfer(R))
    assert s["average_accuracy"] == pytest.approx(np.mean(R[1])) and s["final_task_accuracy"] == R[1][1]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    versions = [r["version"] for r in records]
    assert versions == [1, 2, 3, 4] and s["final_version"] == 4  # one version per round, across stages
    assert [r["stage"] for r in records] == [0, 0, 1, 1]
    ends = [r for r in records if r.get("stage_end")]
    assert [r["accuracy_row"] for r in ends] == [R[0][:1], R[1]]
    assert json.loads((out / "summary.json").read_text())["continual"]["accuracy_matrix"] == R
    # each stage's training rows: 4 clients of an iid split, 120 rows per two-label task
    # 240 rows, 60 per label, 20% held out stratified: each two-label stage reveals 96 rows, tests on 24
    assert s["continual"]["train_examples_per_stage"] == [96, 96]
    assert s["continual"]["test_examples_per_task"] == [24, 24]


def test_per_task_adapters_never_forget_and_match_naive_on_the_last_task(tmp_path):
    naive = tiny_continual(tmp_path, "naive")
    iso = tiny_continual(tmp_path, "iso", **{"continual.per_task_adapters": True})
    assert iso["forgetting"] == 0.0 and iso["backward_transfer"] == 0.0
    # task 1's adapter starts from task 0's final state, as the shared model does, with the same seeds
    assert iso["final_task_accuracy"] == naive["final_task_accuracy"]
    assert iso["continual"]["accuracy_matrix"][0] == naive["continual"]["accuracy_matrix"][0]
    assert (tmp_path / "iso" / "task_states.safetensors").exists()


def test_regularized_replay_run_charges_the_anchor_and_refuses_attacks(tmp_path):
    naive = tiny_continual(tmp_path, "naive")
    reg = tiny_continual(tmp_path, "ewc", **{"continual.regularizer.name": "ewc", "continual.regularizer.strength": 10,
                                             "continual.replay.enabled": True, "continual.replay.capacity": 8})
    # the anchor (stage 0's final global model) travels once to every client that trains in stage 1
    records = [json.loads(x) for x in (tmp_path / "ewc" / "metrics.jsonl").read_text().splitlines()]
    stage1 = {c for r in records if r["stage"] == 1 for c in r["cohort"]}
    anchor_bytes = len(state_to_bytes(load_state(tmp_path / "ewc" / "final_state.safetensors")[0]))
    assert reg["bytes_down_total"] == naive["bytes_down_total"] + len(stage1) * anchor_bytes
    assert reg["continual"]["replay_capacity"] == 8 and reg["continual"]["regularizer"]["name"] == "ewc"
    with pytest.raises(FedfmError, match="data attack 'label_flip'"):  # it would rewrite rows the stream replaces
        tiny_continual(tmp_path, "bad", **{"attack.name": "label_flip", "attack.fraction": 0.25})


def test_continual_runs_on_the_shared_setup_with_codecs_and_workers(tmp_path):
    """The stage loop drives the one-shot run's server and clients: codecs and worker processes combine with it."""
    extra = {"compression.upload": "[int8]", "compression.download": "[fp16]", "compression.error_feedback": True,
             "continual.regularizer.name": "l2", "continual.replay.enabled": True, "continual.replay.capacity": 8,
             "model.method": "lora"}
    one = tiny_continual(tmp_path, "one", workers=1, **extra)
    two = tiny_continual(tmp_path, "two", workers=2, **extra)
    assert one["workers"] == 1 and two["workers"] == 2
    a, b = (load_state(tmp_path / d / "final_state.safetensors")[0] for d in ("one", "two"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    assert one["continual"]["accuracy_matrix"] == two["continual"]["accuracy_matrix"]
    c = one["compression"]
    assert one["bytes_up_total"] == two["bytes_up_total"] and c["upload"] == ["int8"]
    assert c["bytes_up_raw_total"] > 1.5 * c["bytes_up_total"]  # int8 values (tiny LoRA tensors: headers weigh in)
