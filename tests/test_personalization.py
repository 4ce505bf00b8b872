"""Personalization (FedPer, FedRep, Ditto, local-only) on tiny-bert, checked against plain PyTorch loops."""

import json
from collections import OrderedDict
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedfm.algorithms.fedavg import FedAvg
from fedfm.config import load_config
from fedfm.config.schema import ModelConfig, PersonalizationConfig, TrainConfig
from fedfm.data.encode import batch_indices, make_batch
from fedfm.errors import ConfigError, FedfmError
from fedfm.eval.personal import evaluate_personalized
from fedfm.models import build_model
from fedfm.models.state import get_state, load_state, set_state_, state_nbytes
from fedfm.client.personal import PersonalTrainer
from fedfm.personalization import build_plan, check_personalization
from fedfm.personalization.plan import PERSONAL_STATE
from fedfm.client.personal import DITTO_TAG, HEAD_TAG
from fedfm.compression.wire import Wire
from fedfm.client.data import Client
from fedfm.client.trainer import LocalTrainer
from fedfm.seeds import derive_seed
from fedfm.drivers.simulation import simulation

from tables import random_table

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_LABELS = 4
HEAD = ("classifier.weight", "classifier.bias")


@pytest.fixture(scope="module")
def fm():
    return build_model(ModelConfig(name="tiny-bert", method="lora", max_length=16), NUM_LABELS, seed=0)


@pytest.fixture(scope="module")
def initial(fm):
    return get_state(fm.params)


@pytest.fixture()
def model(fm, initial):
    set_state_(fm.params, initial)  # every test starts from the same model
    return fm


@pytest.fixture(scope="module")
def enc():
    return random_table(48, labels=NUM_LABELS, seed=7)


def make_clients(k=2, n_train=10, n_test=6):
    step = n_train + n_test
    return [Client(cid=c, train_idx=np.arange(c * step, c * step + n_train),
                   test_idx=np.arange(c * step + n_train, (c + 1) * step)) for c in range(k)]


def plan_for(fm, method, **kw):
    return build_plan(PersonalizationConfig(method=method, **kw), fm)


def plain_steps(fm, enc, client, opt, steps, seed, batch_size, extra_loss=None):
    """The reference: a plain PyTorch loop over the client's batches (same seeds as the trainer)."""
    torch.manual_seed(seed)
    batches = batch_indices(client.train_idx, batch_size, torch.Generator().manual_seed(seed))
    fm.model.train()
    for _ in range(steps):
        loss = fm.model(**make_batch(enc, next(batches), fm.task)).loss
        if extra_loss is not None:
            loss = loss + extra_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def payload_tensors(payload: bytes) -> tuple[dict, int]:
    """Tensor entries of a safetensors payload and the size of its data section."""
    n = int.from_bytes(payload[:8], "little")
    header = json.loads(payload[8 : 8 + n])
    header.pop("__metadata__", None)
    return header, len(payload) - 8 - n


@pytest.mark.parametrize("method,personal", [("fedper", None), ("fedrep", ["classifier", "*.lora_B.*"])])
def test_personal_tensors_never_go_on_the_wire(model, enc, monkeypatch, method, personal):
    fm = model
    plan = plan_for(fm, method, personal=personal, head_steps=2)
    expect_personal = set(HEAD) | ({k for k in fm.params if ".lora_B." in k} if personal else set())
    assert set(plan.personal_keys) == expect_personal
    sent = {"up": [], "down": []}
    real_up, real_down = Wire.encode_update, Wire.encode_broadcast

    def spy_up(self, u, client_state, round_idx):
        sent["up"].append(real_up(self, u, client_state, round_idx))
        return sent["up"][-1]

    def spy_down(self, b):
        sent["down"].append(real_down(self, b))
        return sent["down"][-1]

    monkeypatch.setattr(Wire, "encode_update", spy_up)
    monkeypatch.setattr(Wire, "encode_broadcast", spy_down)
    clients = make_clients(3)
    trainer = PersonalTrainer(LocalTrainer(fm, enc, TrainConfig(local_steps=2, batch_size=4), seed=0), plan)
    sim = simulation(trainer, FedAvg(), clients, 3, 0, plan.shared(get_state(fm.params)))
    for r in (1, 2):
        sim.run_round(r)
    shared = plan.shared(get_state(fm.params))
    assert list(sim.server.global_state) == list(shared) and not expect_personal & set(sim.server.global_state)
    assert len(sent["up"]) == 6 and len(sent["down"]) == 2
    for kind, prefix in (("up", "delta/"), ("down", "state/")):
        for payload in sent[kind]:
            tensors, data_bytes = payload_tensors(payload)
            assert set(tensors) == {prefix + k for k in shared}
            assert not any(k.split("/", 1)[1] in expect_personal for k in tensors)
            assert data_bytes == state_nbytes(shared) < state_nbytes(get_state(fm.params))
    assert sim.server.ledger.total["up"] == sum(map(len, sent["up"]))
    for c in clients:  # the personal part stayed with its client, trained
        assert set(c.state[PERSONAL_STATE]) == expect_personal
        assert not torch.equal(c.state[PERSONAL_STATE]["classifier.weight"], plan.initial_personal["classifier.weight"])


def test_fedper_head_persists_across_rounds_and_equals_a_plain_loop(model, enc, initial):
    fm = model
    tc = TrainConfig(local_steps=3, batch_size=4, lr=0.05, optimizer="sgd")
    plan = plan_for(fm, "fedper")
    clients = make_clients(2, n_train=10)
    clients[1].train_idx = clients[1].train_idx[:7]  # unequal weights in the mean
    sim = simulation(PersonalTrainer(LocalTrainer(fm, enc, tc, seed=3), plan), FedAvg(), clients, 2, 3,
                     plan.shared(initial))
    heads_after = []
    for r in (1, 2):
        sim.run_round(r)
        heads_after.append({c.cid: OrderedDict(c.state[PERSONAL_STATE]) for c in clients})

    # reference: body averaged by hand, each head carried from round to round by its client
    body = OrderedDict((k, v.clone()) for k, v in initial.items() if k not in HEAD)
    heads = {c.cid: OrderedDict((k, initial[k].clone()) for k in HEAD) for c in clients}
    for r in (1, 2):
        deltas, weights = [], []
        for c in clients:
            set_state_(fm.params, OrderedDict((k, heads[c.cid][k] if k in HEAD else body[k]) for k in initial))
            opt = torch.optim.SGD(list(fm.params.values()), lr=tc.lr)
            plain_steps(fm, enc, c, opt, 3, derive_seed(3, r, c.cid), 4)
            heads[c.cid] = OrderedDict((k, fm.params[k].detach().clone()) for k in HEAD)
            deltas.append({k: fm.params[k].detach() - body[k] for k in body})
            weights.append(len(c.train_idx))
        body = OrderedDict(
            (k, v + (sum(w * d[k].double() for w, d in zip(weights, deltas)) / sum(weights)).float())
            for k, v in body.items()
        )
        for c in clients:
            for k in HEAD:
                torch.testing.assert_close(heads_after[r - 1][c.cid][k], heads[c.cid][k], rtol=0, atol=1e-6)
    for k in body:
        torch.testing.assert_close(sim.server.global_state[k], body[k], rtol=0, atol=1e-6)
    # round 2 continued from each client's own round-1 head, not from the initial or a shared one
    assert not torch.equal(heads_after[1][0]["classifier.weight"], heads_after[1][1]["classifier.weight"])


def test_fedrep_trains_the_head_with_the_body_frozen_then_the_body_with_the_head_frozen(model, enc, initial):
    fm = model
    # AdamW with weight decay: a "frozen" tensor that got a zero gradient would still decay and move
    tc = TrainConfig(local_steps=3, batch_size=4, lr=0.01, optimizer="adamw", weight_decay=0.1)
    plan = plan_for(fm, "fedrep", head_steps=4)
    client = make_clients(1)[0]
    trainer = PersonalTrainer(LocalTrainer(fm, enc, tc, seed=5), plan)
    update = trainer.local_update(FedAvg(), FedAvg().broadcast(plan.shared(initial), 0), client, 1)
    assert all(p.requires_grad for p in fm.params.values())  # the phases' freezing is undone

    set_state_(fm.params, initial)
    head = [fm.params[k] for k in HEAD]
    body = [p for k, p in fm.params.items() if k not in HEAD]
    seed = derive_seed(5, 1, client.cid)
    plain_steps(fm, enc, client, torch.optim.AdamW(head, lr=0.01, weight_decay=0.1), 4, derive_seed(seed, HEAD_TAG), 4)
    for k in body_keys(fm):
        assert torch.equal(fm.params[k], initial[k])  # the head phase moved no body tensor
    ref_head = {k: fm.params[k].detach().clone() for k in HEAD}
    plain_steps(fm, enc, client, torch.optim.AdamW(body, lr=0.01, weight_decay=0.1), 3, seed, 4)
    for k in HEAD:  # the body phase left the head as the head phase made it
        torch.testing.assert_close(client.state[PERSONAL_STATE][k], ref_head[k], rtol=0, atol=1e-6)
        torch.testing.assert_close(fm.params[k].detach(), ref_head[k], rtol=0, atol=0)
    assert list(update.delta) == list(body_keys(fm))
    for k in update.delta:
        torch.testing.assert_close(update.delta[k], fm.params[k].detach() - initial[k], rtol=0, atol=1e-6)
    assert update.metrics["steps"] == 3 and "head_loss" in update.metrics


def body_keys(fm):
    return [k for k in fm.params if k not in HEAD]


def test_ditto_personal_model_equals_a_plain_loop_with_the_proximal_term(model, enc, initial):
    fm = model
    lam = 0.5
    tc = TrainConfig(local_steps=3, batch_size=4, lr=0.1, optimizer="sgd")
    plan = plan_for(fm, "ditto", ditto_lambda=lam)
    assert plan.personal_keys == () and plan.shared_keys == tuple(fm.params)
    client = make_clients(1)[0]
    trainer = PersonalTrainer(LocalTrainer(fm, enc, tc, seed=9), plan)
    plain = LocalTrainer(fm, enc, tc, seed=9)
    # two rounds from two different global models: v_k starts from the first, then persists
    w1 = initial
    w2 = OrderedDict((k, v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1))) for k, v in initial.items())
    updates = {}
    for r, w in ((1, w1), (2, w2)):
        updates[r] = trainer.local_update(FedAvg(), FedAvg().broadcast(w, r - 1), client, r)
        expect = plain.local_update(FedAvg(), FedAvg().broadcast(w, r - 1), Client(0, client.train_idx, client.test_idx), r)
        for k in expect.delta:  # the global model trains exactly as without Ditto
            torch.testing.assert_close(updates[r].delta[k], expect.delta[k], rtol=0, atol=0)
        if r == 1:
            v1 = OrderedDict(client.state[PERSONAL_STATE])

    v = OrderedDict((k, t.clone()) for k, t in w1.items())  # v_k starts from the first global it receives
    for r, w in ((1, w1), (2, w2)):
        set_state_(fm.params, v)
        params = list(fm.params.values())
        anchor = [w[k] for k in fm.params]

        def prox():
            return lam / 2 * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))

        plain_steps(fm, enc, client, torch.optim.SGD(params, lr=0.1), 3, derive_seed(derive_seed(9, r, 0), DITTO_TAG), 4, prox)
        v = get_state(fm.params)
        got = v1 if r == 1 else client.state[PERSONAL_STATE]
        for k in v:
            torch.testing.assert_close(got[k], v[k], rtol=0, atol=1e-6)
    assert not torch.equal(v["classifier.weight"], w2["classifier.weight"])


def head_predicting(label: int) -> OrderedDict:
    """A head whose logits are a one-hot bias: every example is predicted as ``label``."""
    bias = torch.zeros(NUM_LABELS)
    bias[label] = 5.0
    return OrderedDict([("classifier.weight", torch.zeros(NUM_LABELS, 32)), ("classifier.bias", bias)])


@pytest.mark.parametrize("method", ["fedper", "ditto"])
def test_personalized_evaluation_matches_a_hand_computation(model, enc, initial, method):
    fm = model
    plan = plan_for(fm, method)
    clients = make_clients(3, n_train=4, n_test=10)
    clients[2].test_idx = clients[2].test_idx[:0]  # no local test split: not scored
    labels = enc.labels.numpy()
    if method == "fedper":
        plan.initial_personal = head_predicting(3)  # what a client that never trained uses
        clients[0].state[PERSONAL_STATE] = head_predicting(1)
        global_state = plan.shared(initial)
        expect = {0: np.mean(labels[clients[0].test_idx] == 1), 1: np.mean(labels[clients[1].test_idx] == 3)}
    else:
        global_state = OrderedDict({**initial, **head_predicting(0)})  # client 1 never trained: the global model
        clients[0].state[PERSONAL_STATE] = OrderedDict({**initial, **head_predicting(2)})
        expect = {0: np.mean(labels[clients[0].test_idx] == 2), 1: np.mean(labels[clients[1].test_idx] == 0)}
    assert expect[0] != expect[1]
    out = evaluate_personalized(fm, enc, clients, plan, global_state, batch_size=4)
    assert out["per_client_personal"] == pytest.approx({str(c): v for c, v in expect.items()})
    assert out["client_personal_accuracy_mean"] == pytest.approx((expect[0] + expect[1]) / 2)
    assert out["client_personal_accuracy_min"] == pytest.approx(min(expect.values()))
    assert out["client_personal_accuracy_worst10"] == pytest.approx(min(expect.values()))
    assert out["client_personal_accuracy_max"] == pytest.approx(max(expect.values()))
    assert out["client_personal_accuracy_std"] == pytest.approx(abs(expect[0] - expect[1]) / 2)


def one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_config_errors_are_one_line(model):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["personalization.method=fedsomething"])
    assert "personalization.method" in one_line(err)
    with pytest.raises(ConfigError) as err:
        load_config(None, ["personalization.method=ditto", "personalization.personal=[classifier]"])
    assert "fedper and fedrep" in one_line(err)
    with pytest.raises(FedfmError) as err:
        plan_for(model, "fedper", personal=["classifier", "decoder.nothing"])
    assert "'decoder.nothing' matches no trainable tensor" in one_line(err)
    with pytest.raises(FedfmError) as err:
        plan_for(model, "fedrep", personal=["*"])
    assert "method=local" in one_line(err)
    for over, needle in (
        (["personalization.method=local", "privacy.secure_aggregation.enabled=true"], "secure_aggregation"),
        (["personalization.method=local", "robust.rule=median"], "robust.rule=median"),
        (["personalization.method=fedper", "privacy.dp_sgd.enabled=true", "privacy.dp_sgd.noise_multiplier=1"], "dp_sgd"),
    ):
        with pytest.raises(FedfmError) as err:
            check_personalization(load_config(None, over))
        assert needle in one_line(err)
    check_personalization(load_config(None, ["personalization.method=fedper", "privacy.secure_aggregation.enabled=true"]))
    lm = SimpleNamespace(task="causal_lm", model=torch.nn.Linear(2, 2), params=OrderedDict(w=torch.zeros(2)))
    with pytest.raises(FedfmError) as err:
        plan_for(lm, "fedper")
    assert "no task head" in one_line(err)


def write_csv(path, n=120):
    rng = np.random.default_rng(0)
    words = {0: "goal match coach league", 1: "chip laptop code cloud", 2: "bread cheese oven soup"}
    rows = ["text,label"] + [
        f"{' '.join(rng.permutation((words[i % 3] + ' the a of new').split()))},{['sport', 'tech', 'food'][i % 3]}"
        for i in range(n)
    ]
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("method", ["fedrep", "local"])
def test_a_run_reports_personalized_accuracy_and_saves_a_loadable_state(tmp_path, method):
    from fedfm.runner import run

    over = [
        "model.name=tiny-bert", "model.max_length=16", f"data.dataset={write_csv(tmp_path / 'd.csv')}",
        "federation.num_clients=4", "federation.clients_per_round=2", "federation.rounds=2",
        "federation.partition.alpha=0.1", "train.local_steps=2", "eval.every=1", "threads=1", "progress=false",
        f"personalization.method={method}", "personalization.head_steps=2", f"out={tmp_path / 'run'}",
    ]
    s = run(None, over)
    assert 0 <= s["final"]["client_personal_accuracy_mean"] <= 1
    assert s["personalization"]["method"] == method
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("per_client_personal" in r for r in records)  # round 0 too: initial personal parts
    state, meta = load_state(tmp_path / "run" / "final_state.safetensors")
    assert "classifier.weight" in state and "personal_tensors_initial" in meta  # a whole, loadable state
    if method == "local":  # nothing aggregated: only safetensors headers travel up
        assert s["trainable_state_bytes"] == 0 and s["bytes_up_total"] < 300 * 4
    else:
        assert s["trainable_state_bytes"] == state_nbytes(state) - state_nbytes({k: state[k] for k in HEAD})
    # every trained client's personal tensors are kept, exactly as its client state holds them
    personal, _ = load_state(tmp_path / "run" / "personal_states.safetensors")
    trained = sorted({k.split("/")[0] for k in personal})
    assert trained and all(t.startswith("client") for t in trained)
    expected = HEAD if method == "fedrep" else list(state)
    assert sorted(k.split("/", 1)[1] for k in personal if k.startswith(trained[0] + "/")) == sorted(expected)
