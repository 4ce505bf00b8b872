"""Data poisoning (label flipping, backdoor), backdoor success rate and FLTrust wired into runs."""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import fedfm
from fedfm.cli import app
from fedfm.data.encode import encode
from fedfm.errors import FedfmError
from fedfm.eval.backdoor import backdoor_success
from fedfm.robustness import aggregators as agg
from fedfm.robustness import attacks as atk
from fedfm.robustness.poison import check_poisoning, prepare_poisoning
from fedfm.client.data import Client
from test_end_to_end import tiny_cls_overrides

runner = CliRunner()


class WordTokenizer:
    """Whitespace tokenizer with a growing vocabulary (id 0 is padding): enough for ``encode``."""

    def __init__(self) -> None:
        self.vocab = {"[PAD]": 0}
        self.padding_side = "right"

    def __call__(self, texts, max_length, truncation, padding, return_tensors):
        ids = [[self.vocab.setdefault(w, len(self.vocab)) for w in t.split()][:max_length] for t in texts]
        mask = [[1] * len(r) + [0] * (max_length - len(r)) for r in ids]
        ids = [r + [0] * (max_length - len(r)) for r in ids]
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}


def toy(n=40, num_classes=4):
    """Texts 'w<i> x y', labels i mod C, 4 clients of 8 training rows, test rows 32..39."""
    texts = [f"w{i} x y" for i in range(n)]
    labels = np.arange(n) % num_classes
    tok = WordTokenizer()
    enc = encode(texts, tok, 6, labels)
    clients = [Client(cid=c, train_idx=np.arange(8 * c, 8 * c + 8), test_idx=np.zeros(0, np.int64)) for c in range(4)]
    return texts, labels, tok, enc, clients, np.arange(32, 40)


def test_label_flip_changes_exactly_the_malicious_clients_labels():
    texts, labels, tok, enc, clients, test = toy()
    before = [c.train_idx.copy() for c in clients]
    a = atk.Attack(name="label_flip", fraction=0.5)
    out = prepare_poisoning(a, clients, [1, 3], texts, enc, tok, 6, 4, test)
    assert out.backdoor_rows is None and out.poisoned_rows == {1: 8, 3: 8}
    assert torch.equal(out.enc.labels[:40], enc.labels) and torch.equal(out.enc.input_ids[:40], enc.input_ids)
    for cid in (0, 2):  # honest clients: untouched rows, true labels
        assert np.array_equal(clients[cid].train_idx, before[cid])
    for cid in (1, 3):  # same inputs, labels y -> 3 - y
        new, old = torch.as_tensor(clients[cid].train_idx), torch.as_tensor(before[cid])
        assert (new >= 40).all()
        assert torch.equal(out.enc.input_ids[new], enc.input_ids[old])
        assert torch.equal(out.enc.labels[new], 3 - enc.labels[old])
    # an explicit mapping flips only what it names
    texts, labels, tok, enc, clients, test = toy()
    a = atk.Attack(name="label_flip", fraction=0.25, flip_map={0: 2})
    out = prepare_poisoning(a, clients, [0], texts, enc, tok, 6, 4, test)
    assert out.enc.labels[torch.as_tensor(clients[0].train_idx)].tolist() == [2, 1, 2, 3, 2, 1, 2, 3]


def test_backdoor_rows_carry_trigger_and_target_only_for_malicious_clients():
    texts, labels, tok, enc, clients, test = toy()
    before = [c.train_idx.copy() for c in clients]
    a = atk.Attack(name="backdoor", fraction=0.25, target_label=0, trigger="zz", poison_fraction=0.5)
    out = prepare_poisoning(a, clients, [2], texts, enc, tok, 6, 4, test)
    trig = tok.vocab["zz"]
    assert out.poisoned_rows == {2: 4}
    for cid in (0, 1, 3):
        assert np.array_equal(clients[cid].train_idx, before[cid])
        assert not (out.enc.input_ids[torch.as_tensor(clients[cid].train_idx)] == trig).any()
    rows = clients[2].train_idx
    assert len(rows) == 8  # the attacker's training set keeps its size
    clean, poisoned = rows[rows < 40], rows[rows >= 40]
    assert len(poisoned) == 4 and set(clean) < set(before[2])
    ids = out.enc.input_ids[torch.as_tensor(poisoned)]
    assert (ids[:, 0] == trig).all() and (out.enc.labels[torch.as_tensor(poisoned)] == 0).all()
    # the triggered copies are of rows not already in the target class, and of the rows dropped
    src = sorted(set(before[2]) - set(clean))
    assert all(labels[i] != 0 for i in src)
    assert sorted(ids[:, 1].tolist()) == sorted(tok.vocab[f"w{i}"] for i in src)
    # the triggered test rows: every test example not of the target class, labelled with the target
    bd = out.backdoor_rows
    assert len(bd) == int((labels[test] != 0).sum()) == 6
    assert (out.enc.input_ids[torch.as_tensor(bd), 0] == trig).all() and (out.enc.labels[torch.as_tensor(bd)] == 0).all()
    # no attacker, but the baseline is asked for: only the test rows are added
    texts, labels, tok, enc, clients, test = toy()
    out = prepare_poisoning(atk.Attack(name="none"), clients, [], texts, enc, tok, 6, 4, test, eval_backdoor=True)
    assert len(out.backdoor_rows) == 6 and len(out.enc) == 46 and out.poisoned_rows == {}


def test_backdoor_pick_prefers_non_target_rows():
    rng = np.random.default_rng(0)
    assert atk.backdoor_pick([0, 0, 1, 2, 0, 3], 0, 0.5, rng).tolist() == [2, 3, 5]
    assert len(atk.backdoor_pick([0, 0, 1], 0, 1.0, rng)) == 3
    assert len(atk.backdoor_pick([1, 2, 3], 0, 0.01, rng)) == 1  # at least one


class ConstantModel(torch.nn.Module):
    """Predicts class ``pred`` for every input (logits one-hot)."""

    def __init__(self, pred: int, num_classes: int = 3) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.pred, self.num_classes = pred, num_classes

    def forward(self, input_ids, attention_mask):
        logits = torch.zeros(input_ids.shape[0], self.num_classes) + self.w
        logits[:, self.pred] = 1.0
        return SimpleNamespace(logits=logits)


def test_backdoor_success_rate_hand_checked():
    texts = ["a b", "c d", "e f", "g h"]
    true = np.array([1, 2, 0, 1])
    tok = WordTokenizer()
    enc = encode(texts, tok, 4, true)
    clients = [Client(cid=0, train_idx=np.arange(4), test_idx=np.zeros(0, np.int64))]
    out = prepare_poisoning(atk.Attack(name="none", target_label=0), clients, [], texts, enc, tok, 4, 3,
                            np.arange(4), eval_backdoor=True)
    assert len(out.backdoor_rows) == 3  # the example already labelled 0 is left out

    def fm(pred):
        return SimpleNamespace(model=ConstantModel(pred), task="seq_cls", device=torch.device("cpu"))

    assert backdoor_success(fm(0), out.enc, out.backdoor_rows, 2) == 1.0  # always the target
    assert backdoor_success(fm(1), out.enc, out.backdoor_rows, 2) == 0.0  # never the target
    assert math.isnan(backdoor_success(fm(0), out.enc, np.zeros(0, np.int64), 2))
    assert atk.backdoor_success_rate([0, 0, 0, 0], 0, true) == 1.0
    assert atk.backdoor_success_rate([1, 2, 0, 1], 0, true) == 0.0


def test_backdoor_boost_and_alie_with_many_attackers():
    d = OrderedDict(w=torch.tensor([1.0, -2.0]))
    a = atk.Attack(name="backdoor", server_lr=0.5)
    assert torch.equal(a.apply(d, num_clients=5)["w"], torch.tensor([10.0, -20.0]))  # γ = n / η = 10
    assert torch.equal(atk.Attack(name="backdoor", scale=3.0).apply(d, num_clients=5)["w"], torch.tensor([3.0, -6.0]))
    assert torch.equal(atk.Attack(name="label_flip").apply(d, num_clients=5)["w"], d["w"])
    assert torch.equal(atk.Attack(name="sign_flip").apply(d)["w"], -d["w"])  # scale unset: factor 1
    # 3 attackers of 5 leave s = floor(3.5) - 3 = 0 supporters: clamped to 1, z = Phi^-1(4/5)
    assert atk.alie_z(5, 3) == pytest.approx(0.841621, abs=1e-6)


def test_fltrust_fold_gives_a_sign_flipped_update_zero_trust():
    calls = []

    def server_update(g, version):
        calls.append((float(g["w"][0]), version))
        return OrderedDict(w=torch.tensor([1.0, 0.0]))

    fold = agg.build_robust_fold("fltrust", server_update=server_update)
    fold.start(OrderedDict(w=torch.tensor([5.0, 5.0])), version=4)
    for i, v in enumerate([[2.0, 0.0], [-2.0, 0.0], [1.0, 1.0]]):  # honest, sign-flipped, 45 degrees off
        fold.add(agg.Update(client_id=i, delta=OrderedDict(w=torch.tensor(v)), num_examples=1))
    new = fold.finish()
    r = 1 / math.sqrt(2)  # ReLU(cos): 1, 0, 1/sqrt(2)
    assert torch.allclose(fold.last_trust, torch.tensor([1.0, 0.0, r]))
    assert calls == [(5.0, 4)]  # g_0 from the round's global state and version
    # rescaled to ||g_0|| = 1: (1*(1,0) + r*(r,r)) / (1 + r), added to the global state
    assert torch.allclose(new["w"], torch.tensor([5 + 1.5 / (1 + r), 5 + 0.5 / (1 + r)]))


def _run(tmp_path, name, **extra):
    over = {
        "federation.rounds": 2,
        "train.local_steps": 1,
        "eval.every": 1,
        "eval.clients": False,
        "out": tmp_path / name,
    }
    over.update(extra)
    return fedfm.run(None, tiny_cls_overrides(tmp_path, **over))


def test_backdoor_run_reports_success_rate_every_eval(tmp_path):
    s = _run(tmp_path, "bd", **{"attack.name": "backdoor", "attack.fraction": 0.34, "attack.target_label": 1})
    records = [json.loads(x) for x in (tmp_path / "bd" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    assert all(0.0 <= r["backdoor_success_rate"] <= 1.0 for r in records)
    assert s["backdoor_success_rate"] == records[-1]["backdoor_success_rate"]
    assert s["attack"] == "backdoor" and len(s["malicious_clients"]) == 2
    assert sorted(s["poisoned_rows"]) == [str(c) for c in s["malicious_clients"]]
    # a clean run reports the baseline only when asked
    clean = _run(tmp_path, "clean", **{"federation.rounds": 1, "eval.every": 0})
    assert "backdoor_success_rate" not in clean
    base = _run(tmp_path, "base", **{"federation.rounds": 1, "eval.every": 0, "eval.backdoor": True})
    assert 0.0 <= base["backdoor_success_rate"] <= 1.0
    assert base["final_accuracy"] == clean["final_accuracy"]  # the extra rows change nothing else


def test_label_flip_run(tmp_path):
    s = _run(tmp_path, "lf", **{"attack.name": "label_flip", "attack.fraction": 0.5, "eval.every": 0, "federation.rounds": 1})
    assert s["attack"] == "label_flip" and len(s["malicious_clients"]) == 3
    assert "backdoor_success_rate" not in s


def test_fltrust_run_carves_root_out_of_the_holdout_and_logs_trust(tmp_path):
    s = _run(
        tmp_path, "ft",
        **{"robust.rule": "fltrust", "robust.root_examples": 30, "attack.name": "sign_flip", "attack.fraction": 0.34,
           "attack.scale": 4.0, "eval.every": 0},
    )
    assert s["robust_rule"] == "fltrust" and s["fltrust_root_examples"] == 30
    assert 0 <= s["final_accuracy"] <= 1
    records = [json.loads(x) for x in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    for r in records:  # one trust score in [0, 1] per client folded
        assert sorted(int(c) for c in r["fltrust_trust"]) == r["cohort"]
        assert all(0 <= t <= 1 for t in r["fltrust_trust"].values())
    # the 72 held-out examples: 30 are the server's root data, the other 42 the test set
    from fedfm.config import load_config
    from fedfm.data.sources import load_text_dataset
    from fedfm.build import build_clients, split_holdout

    cfg = load_config(tmp_path / "ft" / "config.yaml")
    ds = load_text_dataset(cfg.data, cfg.model.task, seed=cfg.seed)
    pool, test, root = split_holdout(cfg, ds)
    assert len(root) == 30 and len(test) == 42 and not set(root) & set(test) and not set(root) & set(pool)
    test_idx, clients, _ = build_clients(cfg, ds)
    assert np.array_equal(test_idx, test) and not set(root) & {int(i) for c in clients for i in c.train_idx}


@pytest.mark.parametrize(
    "extra, fragment",
    [
        ({"robust.rule": "fltrust", "robust.root_examples": 72},
         "robust.root_examples=72 must be smaller than the 72 held-out examples"),
        ({"attack.name": "label_flip", "attack.fraction": 0.5, "attack.flip_map": "{0: 7}"}, "attack.flip_map"),
        ({"attack.name": "backdoor", "attack.fraction": 0.5, "attack.target_label": 3},
         "attack.target_label=3 is not a class of this dataset (0..2)"),
    ],
)
def test_bad_attack_and_fltrust_configs_are_one_line_errors(tmp_path, extra, fragment):
    res = runner.invoke(app, ["run", *tiny_cls_overrides(tmp_path, **extra)])
    assert res.exit_code == 2, res.output
    lines = [x for x in res.output.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], res.output


@pytest.mark.parametrize("extra", [{"attack.name": "backdoor"}, {"attack.name": "label_flip"}, {"eval.backdoor": True}])
def test_data_attacks_refuse_causal_lm(tmp_path, extra):
    lines = tmp_path / "lines.jsonl"
    lines.write_text("".join(json.dumps({"text": f"to be or not {i}"}) + "\n" for i in range(40)))
    args = ["run", "model.name=tiny-llama", "model.task=causal_lm", f"data.dataset={lines}", "data.label_column=null",
            "federation.num_clients=4", "federation.clients_per_round=2", "federation.partition.scheme=iid",
            "attack.fraction=0.5", "progress=false", f"out={tmp_path / 'lm'}"] + [f"{k}={v}" for k, v in extra.items()]
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    out = res.output.strip()
    assert len(out.splitlines()) == 1 and "needs a classification task (model.task=seq_cls)" in out, out


def test_check_poisoning_directly():
    check_poisoning(atk.Attack(name="sign_flip"), "causal_lm", None)  # model attacks are fine for LMs
    with pytest.raises(FedfmError, match="causal_lm"):
        check_poisoning(atk.Attack(name="backdoor"), "causal_lm", None)
