"""FedNova (fedfm/algorithms/fednova.py) against hand computations, its capabilities and a tiny run."""

import json
import math
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import load_file

import fedfm
from fedfm.algorithms import Update, build_algorithm
from fedfm.algorithms.fedavg import MeanDeltaFold
from fedfm.algorithms.fedopt import ServerSGD
from fedfm.algorithms.fednova import FedNovaFold
from fedfm.config import load_config
from fedfm.errors import FedfmError
from fedfm.registry import ALGORITHMS, ASYNC_SAFE, MEAN_DELTA, MERGEABLE, PLAIN_CLIENT, SECURE_SUM

pytestmark = pytest.mark.usefixtures("one_thread")

X0 = OrderedDict(w=torch.tensor([1.0, -1.0]), step=torch.tensor(3))  # a non-float tensor keeps its value
# (delta, examples, local steps) of three clients; hand values below
CLIENTS = [([2.0, 4.0], 10, 2), ([3.0, 0.0], 20, 3), ([-1.0, 1.0], 10, 1)]


def U(cid, delta, n, steps):
    return Update(client_id=cid, delta=OrderedDict(w=torch.tensor(delta), step=torch.tensor(0)), num_examples=n,
                  metrics={"train_loss": 1.0, "steps": float(steps)})


def one_round(fold, clients=CLIENTS, x=X0):
    fold.start(x)
    for i, c in enumerate(clients):
        fold.add(U(i, *c))
    return fold.finish()


def test_normalized_averaging_by_hand():
    # p = (10, 20, 10), P = 40; d_i = delta_i / tau_i = (1, 2), (1, 0), (-1, 1)
    # sum p d = (10 + 20 - 10, 20 + 0 + 10) = (20, 30); tau_eff = (20 + 60 + 10) / 40 = 2.25
    # step = tau_eff * (20, 30) / 40 = (1.125, 1.6875)
    out = one_round(FedNovaFold())
    assert torch.allclose(out["w"], torch.tensor([1.0 + 1.125, -1.0 + 1.6875]))
    assert int(out["step"]) == 3 and out["w"].dtype == torch.float32
    # FedAvg: sum p delta / P = (20 + 60 - 10, 40 + 0 + 10) / 40 = (1.75, 1.25): not the same point
    fedavg = one_round(MeanDeltaFold())
    assert torch.allclose(fedavg["w"], torch.tensor([1.0 + 1.75, -1.0 + 1.25]))
    # the server lr scales the step; uniform weights: P = 3, tau_eff = 2, sum d = (1, 3) -> (2/3, 2)
    half = one_round(FedNovaFold(ServerSGD(0.5)))
    assert torch.allclose(half["w"], torch.tensor([1.0 + 0.5625, -1.0 + 0.84375]))
    uniform = one_round(FedNovaFold(weighting="uniform"))
    assert torch.allclose(uniform["w"], torch.tensor([1.0 + 2 / 3, -1.0 + 2.0]))


def test_equal_local_steps_is_fedavg():
    same = [(d, n, 4) for d, n, _ in CLIENTS]
    for weighting in ("examples", "uniform"):
        a = one_round(FedNovaFold(weighting=weighting), same)
        b = one_round(MeanDeltaFold(weighting=weighting), same)
        assert torch.allclose(a["w"], b["w"], atol=1e-7, rtol=0), (a, b)


@pytest.mark.parametrize("steps", [None, 0, 0.5, -2, float("nan"), float("inf"), "many"])
def test_local_steps_are_validated(steps):
    fold = FedNovaFold()
    fold.start(X0)
    u = U(7, [1.0, 1.0], 5, 1)
    if steps is None:
        del u.metrics["steps"]
    else:
        u.metrics["steps"] = steps
    with pytest.raises(ValueError, match="client 7"):
        fold.add(u)


def test_zero_weight_updates_and_empty_rounds():
    fold = FedNovaFold()
    fold.start(X0)
    assert fold.add(U(0, [5.0, 5.0], 0, 3)) is False and fold.num_folded == 0
    out = fold.finish()
    assert torch.equal(out["w"], X0["w"]) and out["w"] is not X0["w"]


def test_partial_folds_merge_to_the_single_process_result():
    whole = one_round(FedNovaFold())
    parts = [FedNovaFold(), FedNovaFold()]
    for p in parts:
        p.start(X0)
    for i, c in enumerate(CLIENTS):
        parts[i % 2].add(U(i, *c))
    partials = [p.partial() for p in parts]
    total = OrderedDict((k, sum(s[k] for s, _ in partials)) for k in partials[0][0])
    parts[0].merge(total, [s for _, s in partials])
    assert parts[0].tau_eff == pytest.approx(2.25)
    assert torch.allclose(parts[0].finish()["w"], whole["w"], atol=1e-7, rtol=0)


def test_registered_with_the_capabilities_it_has():
    entry = ALGORITHMS.get("fednova")
    assert entry.supports(MERGEABLE, ASYNC_SAFE, PLAIN_CLIENT)
    assert not entry.supports(SECURE_SUM) and not entry.supports(MEAN_DELTA)  # it needs every tau_i
    algo = build_algorithm(load_config(None, ["algorithm.name=fednova", "algorithm.server_lr=0.5"]).algorithm, 4)
    assert algo.name == "fednova" and isinstance(algo.fold, FedNovaFold) and algo.fold.optimizer.lr == 0.5
    with pytest.raises(NotImplementedError):
        algo.fold.summand(U(0, [1.0, 1.0], 1, 1), 10.0)


# -- end to end ------------------------------------------------------------------------------------
def write_topic_csv(path, n=240):
    import random

    words = {
        "sport": "goal match striker coach league penalty keeper referee".split(),
        "tech": "software chip laptop network server browser robot code".split(),
        "food": "bread cheese recipe oven garlic pasta butter salad".split(),
    }
    rng = random.Random(0)
    rows = ["text,label"]
    for i in range(n):
        label = list(words)[i % 3]
        rows.append(f"{' '.join(rng.choices(words[label], k=6))},{label}")
    path.write_text("\n".join(rows) + "\n")
    return path


def tiny_cls_overrides(tmp_path, **extra):
    """Uneven shards (quantity skew) and one local epoch: every client takes its own number of steps."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    base = {
        "model.name": "tiny-bert",
        "model.method": "full",
        "model.max_length": 16,
        "data.dataset": str(write_topic_csv(tmp_path / "topics.csv")),
        "federation.num_clients": 6,
        "federation.clients_per_round": 3,
        "federation.rounds": 4,
        "federation.partition.scheme": "quantity",
        "federation.partition.alpha": 1.0,
        "algorithm.name": "fednova",
        "train.local_epochs": 1,
        "train.batch_size": 8,
        # a random-init tiny BERT needs Adam to learn in 4 rounds; FedNova's 1/tau_i is then the heuristic
        # of the module doc (exact for local SGD, as in the hand computations above)
        "train.optimizer": "adamw",
        "train.lr": 0.01,
        "eval.every": 2,
        "threads": 1,
        "progress": False,
        "out": str(tmp_path / "run"),
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def test_tiny_fednova_run_learns_and_splits_across_workers(tmp_path):
    summary = fedfm.run(None, tiny_cls_overrides(tmp_path / "one", workers=1))
    assert summary["final_accuracy"] > 0.6, summary  # chance is 1/3
    records = [json.loads(line) for line in (tmp_path / "one" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["accepted"] for r in records[1:]] == [3, 3, 3, 3]
    assert all(math.isfinite(r["train_loss"]) for r in records[1:])
    # mergeable: two worker processes fold their shares and end where one process does
    fedfm.run(None, tiny_cls_overrides(tmp_path / "two", workers=2))
    a = load_file(tmp_path / "one" / "run" / "final_state.safetensors")
    b = load_file(tmp_path / "two" / "run" / "final_state.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    # the clients' step counts differ, so FedAvg ends elsewhere
    fedfm.run(None, tiny_cls_overrides(tmp_path / "avg", workers=1, **{"algorithm.name": "fedavg"}))
    c = load_file(tmp_path / "avg" / "run" / "final_state.safetensors")
    assert max(float((a[k] - c[k]).abs().max()) for k in a) > 1e-4


def test_what_fednova_cannot_serve_is_refused_in_one_line(tmp_path):
    from fedfm.server.compose import build_algorithm_fold, check_secure_aggregation

    secure = load_config(None, ["algorithm.name=fednova", "privacy.secure_aggregation.enabled=true"])
    with pytest.raises(FedfmError, match="secure aggregation supports .* not fednova"):
        check_secure_aggregation(secure)
    robust = load_config(None, ["algorithm.name=fednova", "robust.rule=median"])
    with pytest.raises(FedfmError, match="robust.rule=median needs an algorithm .* not fednova"):
        build_algorithm_fold(robust, num_clients=20)
