"""Local sample-level DP-SGD (fedfm/privacy/dp_sgd.py): clipping, noise, per-client accounting, runs."""

import json
import logging

import dp_accounting
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from typer.testing import CliRunner

import fedfm
from fedfm.algorithms import FedAvg
from fedfm.algorithms.base import Broadcast
from fedfm.cli import app
from fedfm.config import load_config
from fedfm.config.schema import ModelConfig, TrainConfig
from fedfm.errors import ConfigError
from fedfm.data.encode import encode, make_batch
from fedfm.models import build_model, get_state, set_state_
from fedfm.privacy.dp_sgd import (
    LocalDPSGD,
    PerExampleGradients,
    SampleLevelAccountant,
    calibrate_noise_multiplier,
    calibrate_per_client,
    epsilon_for,
    poisson_sample,
    sampling_rate_for,
)
from fedfm.client.data import Client
from fedfm.client.trainer import LocalTrainer
from fedfm.seeds import derive_seed
from test_end_to_end import tiny_cls_overrides

TEXTS = [
    "the striker scored a late penalty",
    "new chip makes the laptop faster",
    "bake the bread with garlic butter",
    "coach said the season is over for the keeper",
    "cloud server network went down today",
    "soup",
    "the referee and the stadium crowd argued about the goal for a long time",
    "pasta with cheese",
]
LABELS = np.array([0, 1, 2, 0, 1, 2, 0, 2])

# A plain backward pass through a model that carries (disabled) Opacus hooks warns; harmless here.
pytestmark = [pytest.mark.filterwarnings("ignore:Full backward hook is firing"), pytest.mark.usefixtures("one_thread")]




def tiny(name="tiny-bert", task="seq_cls", method="lora", pooling="cls"):
    cfg = ModelConfig(name=name, task=task, method=method, max_length=16, prompt={"num_virtual_tokens": 4},
                      pooling=pooling)
    fm = build_model(cfg, 3 if task == "seq_cls" else None, seed=0)
    for m in fm.model.modules():  # deterministic forward passes, so batched == one at a time
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    fm.model.train()
    enc = encode(TEXTS, fm.tokenizer, 16, LABELS if task == "seq_cls" else None)
    return fm, enc


def one_at_a_time(fm, enc, idx):
    """Each example's gradient from its own backward pass of the model's own loss (plain PyTorch)."""
    grads = []
    for i in idx.tolist():
        for p in fm.params.values():
            p.grad = None
        fm.model(**make_batch(enc, torch.tensor([i]), fm.task)).loss.backward()
        grads.append({k: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for k, p in fm.params.items()})
    for p in fm.params.values():
        p.grad = None
    return grads


# -- (a) per-example clipping ---------------------------------------------------------
@pytest.mark.parametrize(
    "name, task, method, engine, used, pooling",
    [
        ("tiny-bert", "seq_cls", "lora", "auto", "hooks", "cls"),  # Opacus hooks: LoRA Linear + the head
        ("tiny-bert", "seq_cls", "lora", "auto", "hooks", "mean"),
        ("tiny-llama", "causal_lm", "lora", "auto", "hooks", "cls"),  # per-example loss = mean over its tokens
        ("tiny-bert", "seq_cls", "prompt", "auto", "loop", "cls"),  # peft broadcasts the soft prompt: fallback
        ("tiny-bert", "seq_cls", "lora", "loop", "loop", "cls"),
    ],
)
def test_clipped_sum_equals_a_plain_loop_over_examples(name, task, method, engine, used, pooling):
    fm, enc = tiny(name, task, method, pooling)
    idx = torch.tensor([0, 2, 3, 5, 6, 7])
    ref = one_at_a_time(fm, enc, idx)
    norms = [torch.sqrt(sum(g.pow(2).sum() for g in r.values())).item() for r in ref]
    C = float(np.median(norms))  # some examples are clipped, some are not
    assert min(norms) < C < max(norms)
    want = {k: sum(min(1.0, C / n) * r[k] for r, n in zip(ref, norms)) for k in fm.params}

    grads = PerExampleGradients(fm.model, fm.params, fm.task, engine)
    sums, losses = grads.clipped_sum(enc, idx, C)
    assert grads.engine == used
    for (k, _), got in zip(fm.params.items(), sums):
        torch.testing.assert_close(got, want[k], atol=1e-5, rtol=1e-5, msg=k)
    own = [fm.model(**make_batch(enc, torch.tensor([i]), fm.task)).loss.item() for i in idx.tolist()]
    assert losses.tolist() == pytest.approx(own, rel=1e-5, abs=1e-6)
    assert all(p.grad is None for p in fm.params.values())


def test_hooks_are_off_outside_dp_steps():
    fm, enc = tiny()
    PerExampleGradients(fm.model, fm.params, fm.task, "hooks")
    with torch.no_grad():
        out = fm.model(**make_batch(enc, torch.arange(4), "seq_cls")).logits
    fm.model(**make_batch(enc, torch.arange(4), "seq_cls")).loss.backward()
    assert all(getattr(p, "grad_sample", None) is None for p in fm.params.values())
    assert out.shape == (4, 3)


# -- (b) sigma = 0, no clipping: a plain SGD step -------------------------------------------
def test_sigma_zero_unclipped_step_is_sgd_on_the_poisson_batch_over_expected_size():
    fm, enc = tiny()
    n, B, lr, seed, rnd = len(TEXTS), 4, 0.5, 3, 2
    client = Client(cid=0, train_idx=np.arange(n), test_idx=np.arange(0))
    dp = LocalDPSGD(fm, enc, SampleLevelAccountant(0.0, {0: n}, B), max_grad_norm=1e6, reproducible=True)
    trainer = LocalTrainer(fm, enc, TrainConfig(local_steps=1, batch_size=B, lr=lr, optimizer="sgd"), seed, dp_sgd=dp)
    start = get_state(fm.params)
    update = trainer.local_update(FedAvg(), Broadcast(start), client, rnd)

    q = sampling_rate_for(B, n)
    idx = poisson_sample(torch.arange(n), q, torch.Generator().manual_seed(derive_seed(seed, rnd, 0)))
    assert 0 < len(idx) != q * n  # a variable-size batch, divided by the expected size
    set_state_(fm.params, start)
    opt = torch.optim.SGD(fm.params.values(), lr=lr)
    batch = make_batch(enc, idx, "seq_cls")
    logits = fm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = F.cross_entropy(logits, batch["labels"], reduction="sum") / (q * n)
    opt.zero_grad()
    loss.backward()
    opt.step()
    for k, p in fm.params.items():
        torch.testing.assert_close(update.delta[k], p.detach() - start[k], atol=1e-6, rtol=1e-5, msg=k)
    assert update.metrics["train_loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert dp.accountant.steps[0] == 1 and dp.accountant.participations[0] == 1


# -- (c) the noise ----------------------------------------------------------------------------
@pytest.mark.parametrize("share", [1.0, 0.5])  # 0.5: one of t = 4 distributed noise shares
def test_noise_std_is_sigma_c_over_expected_batch(share):
    fm, enc = tiny()
    n, B, sigma, C = len(TEXTS), 4, 2.0, 0.5
    start = get_state(fm.params)
    noisy = LocalDPSGD(fm, enc, SampleLevelAccountant(sigma, {0: n}, B), max_grad_norm=C, noise_share=share,
                       reproducible=True)
    clean = LocalDPSGD(fm, enc, SampleLevelAccountant(0.0, {0: n}, B), max_grad_norm=C, reproducible=True)
    draws = []
    for seed in range(3):
        grads = []
        for dp in (noisy, clean):  # same seed: same Poisson batch, so the difference is the noise
            set_state_(fm.params, start)
            dp.session(0, np.arange(n), 1, seed).step()
            grads.append(torch.cat([p.grad.flatten() for p in fm.params.values()]))
        draws.append(grads[0] - grads[1])
    x = torch.cat(draws)  # 3 x 2,147 coordinates
    want = share * sigma * C / (B / n * n)
    assert abs(x.std().item() - want) < 0.15 * want
    assert abs(x.mean().item()) < 4 * want / len(x) ** 0.5
    assert not torch.equal(draws[0], draws[1])  # fresh noise per session


# -- distributed noise under secure aggregation --------------------------------------------------
def test_one_step_rounds_at_one_sampling_rate_aggregate_to_central_dp_sgd():
    """FedAvg of one-step DP-SGD updates = one DP-SGD step on the union of the silos' data.

    The reference is a plain per-example loop: every example of every silo's Poisson
    batch clipped to C, summed over all silos and divided by the expected batch of the
    union, q * sum(n_i); that is what makes the distributed noise shares add up to
    central DP-SGD's noise (fedfm.privacy.dp_sgd, "Distributed noise").
    """
    fm, enc = tiny()
    q, C, lr, seed, rnd = 0.6, 0.05, 0.5, 3, 1
    parts = [np.array([0, 3, 6]), np.array([1, 4]), np.array([2, 5, 7])]
    clients = [Client(cid=c, train_idx=p, test_idx=np.arange(0)) for c, p in enumerate(parts)]
    acc = SampleLevelAccountant(0.0, {c: len(p) for c, p in enumerate(parts)}, batch_size=16, sampling_rate=q)
    dp = LocalDPSGD(fm, enc, acc, max_grad_norm=C, noise_share=0.5, reproducible=True)
    trainer = LocalTrainer(fm, enc, TrainConfig(local_steps=1, batch_size=16, lr=lr, optimizer="sgd"), seed, dp_sgd=dp)
    start = get_state(fm.params)
    fold = FedAvg()
    fold.start(start)
    for client in clients:
        set_state_(fm.params, start)
        fold.add(trainer.local_update(FedAvg(), Broadcast(start), client, rnd))
    new = fold.finish()

    set_state_(fm.params, start)
    batch = torch.cat([poisson_sample(torch.as_tensor(c.train_idx), q, torch.Generator().manual_seed(
        derive_seed(seed, rnd, c.cid))) for c in clients])
    assert 0 < len(batch) < len(TEXTS)
    total = {k: torch.zeros_like(p) for k, p in fm.params.items()}
    clipped = 0
    for g in one_at_a_time(fm, enc, batch):
        norm = torch.sqrt(sum(v.pow(2).sum() for v in g.values()))
        clipped += bool(norm > C)
        for k in total:
            total[k] += g[k] * min(1.0, C / float(norm))
    assert clipped == len(batch)  # C is small enough to clip every example
    for k in total:
        want = start[k] - lr * total[k] / (q * len(TEXTS))
        torch.testing.assert_close(new[k], want, atol=1e-6, rtol=1e-5, msg=k)
    assert acc.q == {0: q, 1: q, 2: q} and all(t == 1 for t in acc.steps.values())


DISTRIBUTED = {
    "model.method": "lora",
    "federation.clients_per_round": 6,
    "train.local_steps": 1,
    "train.optimizer": "sgd",
    "train.lr": 0.5,
    "privacy.dp_sgd.enabled": True,
    "privacy.dp_sgd.noise": "distributed",
    "privacy.dp_sgd.sampling_rate": 0.5,
    "privacy.secure_aggregation.enabled": True,
    "privacy.secure_aggregation.threshold": 4,
}


def test_distributed_noise_run_calibrates_one_sigma_and_splits_it_in_shares(tmp_path):
    over = {**DISTRIBUTED, "federation.rounds": 3, "eval.every": 0, "privacy.dp_sgd.target_epsilon": 8.0}
    s = fedfm.run(None, tiny_cls_overrides(tmp_path, **over))
    d, recs = s["privacy"]["dp_sgd"], records(tmp_path / "run")
    assert d["noise_share"] == pytest.approx(0.5) and d["sampling_rate"] == 0.5  # 1 / sqrt(t = 4)
    assert d["noise_multiplier"] == d["noise_multiplier_min"] > 0  # one sigma for the sum
    assert epsilon_for(d["noise_multiplier"], 0.5, 1e-5, 3) == pytest.approx(8.0, rel=2e-3)
    for v in d["per_client"].values():  # every silo in every round: 3 steps at q = 0.5
        assert v["sampling_rate"] == 0.5 and v["steps"] == 3 and v["epsilon"] <= 8.0
    assert d["epsilon_max"] == pytest.approx(8.0, rel=2e-3)
    rounds = [r for r in recs if "secagg_survivors" in r]
    assert [(r["round"], r["secagg_survivors"], r["secagg_threshold"], r["secagg_clipped"]) for r in rounds] == [
        (1, 6, 4, 0), (2, 6, 4, 0), (3, 6, 4, 0)]


@pytest.mark.parametrize(
    "extra, fragment",
    [
        ({"privacy.secure_aggregation.enabled": False}, "needs privacy.secure_aggregation.enabled=true"),
        ({"privacy.secure_aggregation.threshold": None}, "needs privacy.secure_aggregation.threshold"),
        ({"privacy.dp_sgd.sampling_rate": None}, "needs privacy.dp_sgd.sampling_rate"),
        ({"train.local_steps": 2}, "needs train.local_steps=1"),
        ({"train.optimizer": "adamw"}, "needs train.optimizer=sgd"),
        ({"algorithm.weighting": "uniform"}, "needs algorithm.weighting=examples"),
        ({"privacy.client_dp.enabled": True, "privacy.client_dp.noise_multiplier": 1.0}, "cannot be combined with privacy.client_dp"),
        ({"privacy.secure_aggregation.max_weight": 2}, "more than privacy.secure_aggregation.max_weight=2"),
    ],
)
def test_distributed_noise_refuses_what_breaks_its_guarantee_in_one_line(tmp_path, extra, fragment):
    over = {**DISTRIBUTED, "privacy.dp_sgd.noise_multiplier": 1.0, "federation.rounds": 1, **extra}
    over = {k: v for k, v in over.items() if v is not None}
    res = CliRunner().invoke(app, ["run", *tiny_cls_overrides(tmp_path, **over)])
    lines = [x for x in res.output.strip().splitlines() if x.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and fragment in lines[0], res.output
    assert "privacy.dp_sgd.noise=distributed" in lines[0]


def test_accountant_with_one_sampling_rate_survives_a_state_dict_round_trip():
    acc = SampleLevelAccountant(1.3, {0: 10, 1: 400}, batch_size=16, sampling_rate=0.05)
    assert acc.q == {0: 0.05, 1: 0.05}  # not min(1, 16 / n_i)
    acc.step(1, 7)
    again = SampleLevelAccountant(0.0, {9: 1}, 1)
    again.load_state_dict(json.loads(json.dumps(acc.state_dict())))
    assert again.q == acc.q and again.epsilon(1) == acc.epsilon(1) == epsilon_for(1.3, 0.05, 1e-5, 7)
    with pytest.raises(ValueError, match="sampling_rate must be in"):
        SampleLevelAccountant(1.0, {0: 1}, 1, sampling_rate=1.5)


# -- (d) accounting ------------------------------------------------------------------------
def direct_epsilon(sigma, q, delta, steps, accountant):
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )
    acc = accountant()
    acc.compose(event)
    return acc.get_epsilon(delta)


def test_per_client_epsilon_matches_dp_accounting():
    sizes = {0: 100, 1: 10, 2: 400, 3: 250_000}
    acc = SampleLevelAccountant(1.1, sizes, batch_size=16)
    assert acc.q == {0: 0.16, 1: 1.0, 2: 0.04, 3: 16 / 250_000}
    assert acc.delta == {0: 1e-5, 1: 1e-5, 2: 1e-5, 3: 4e-6}  # min(1e-5, 1/n)
    for cid, t in ((0, 30), (1, 5), (3, 7)):
        acc.step(cid, t)
    rdp = rdp_privacy_accountant.RdpAccountant
    want = {c: direct_epsilon(1.1, acc.q[c], acc.delta[c], acc.steps[c], rdp) for c in (0, 1, 3)}
    for c, e in want.items():
        assert acc.epsilon(c) == pytest.approx(e, rel=1e-12)
    assert acc.epsilon(2) == 0.0
    assert acc.epsilon_max() == pytest.approx(max(want.values()))
    assert acc.epsilon_mean() == pytest.approx(np.mean(list(want.values())))  # over clients that trained
    again = SampleLevelAccountant(0.5, {9: 1}, 1)
    again.load_state_dict(json.loads(json.dumps(acc.state_dict())))
    assert again.epsilon(0) == acc.epsilon(0) and again.steps == acc.steps

    pld = SampleLevelAccountant(1.1, {0: 100}, batch_size=16, delta=1e-6, kind="pld")
    pld.step(0, 30)
    want_pld = direct_epsilon(1.1, 0.16, 1e-6, 30, pld_privacy_accountant.PLDAccountant)
    assert pld.epsilon(0) == pytest.approx(want_pld, rel=1e-9)


def test_calibration_puts_the_worst_client_at_the_target():
    plans = [(0.16, 1e-5, 32), (1.0, 1e-5, 32), (0.04, 1e-5, 32), (0.5, 1e-5, 8)]
    sigma = calibrate_noise_multiplier(4.0, plans)
    eps = [epsilon_for(sigma, q, d, t) for q, d, t in plans]
    assert max(eps) <= 4.0 and max(eps) == pytest.approx(4.0, rel=2e-3)
    assert eps[1] == max(eps)  # q = 1 is the worst at equal steps


def test_per_client_calibration_puts_every_client_at_the_target_and_the_worst_at_the_shared_sigma():
    plans = {0: (0.16, 1e-5, 32), 1: (1.0, 1e-5, 32), 2: (0.04, 1e-5, 32), 3: (0.5, 1e-5, 8), 4: (0.04, 1e-5, 32)}
    sigma = calibrate_per_client(4.0, plans)
    for cid, (q, d, t) in plans.items():
        assert epsilon_for(sigma[cid], q, d, t) == pytest.approx(4.0, rel=2e-3), cid
    assert sigma[2] == sigma[4] and sigma[2] < sigma[0] < sigma[1]  # more amplification, less noise
    assert max(sigma.values()) == pytest.approx(calibrate_noise_multiplier(4.0, list(plans.values())), rel=1e-6)
    acc = SampleLevelAccountant(sigma, {c: 100 for c in plans}, batch_size=4)
    acc.step(2, 32)
    assert acc.noise_multiplier == max(sigma.values())
    restored = SampleLevelAccountant(0.0, {0: 1}, 1)
    restored.load_state_dict(acc.state_dict())
    assert restored.sigma == acc.sigma and restored.epsilon(2) == acc.epsilon(2)


def test_a_session_adds_noise_of_its_own_clients_sigma():
    fm, enc = tiny()
    n, C = len(TEXTS), 0.5
    acc = SampleLevelAccountant({0: 0.0, 1: 3.0}, {0: n, 1: n}, batch_size=4)
    dp = LocalDPSGD(fm, enc, acc, max_grad_norm=C, engine="loop", reproducible=True)
    quiet = [dp.session(0, np.arange(n), 1, seed=s) for s in range(2)]
    loud = [dp.session(1, np.arange(n), 1, seed=s) for s in range(2)]
    grads = []
    for sessions in (quiet, loud):
        for sess in sessions:
            sess.step()
            grads.append(torch.cat([p.grad.flatten() for p in fm.params.values()]).clone())
    # same seed, same Poisson batch: the difference is client 1's noise alone, std 3 C / (q n) = 3 C / 4
    noise = torch.cat([grads[2] - grads[0], grads[3] - grads[1]])
    assert float(noise.std()) == pytest.approx(3.0 * C / 4, rel=0.15)


def test_a_client_past_its_budget_sits_out(caplog):
    fm, enc = tiny()
    acc = SampleLevelAccountant(1.0, {0: 8, 1: 100}, batch_size=4)
    target = acc.epsilon(0, 4) * 1.0001  # two participations of 2 steps for client 0
    dp = LocalDPSGD(fm, enc, acc, target_epsilon=target, steps_per_round={0: 2, 1: 2}, engine="loop")
    for _ in range(2):
        s = dp.session(0, np.arange(8), 2, seed=1)
        s.step(), s.step()
    with caplog.at_level(logging.WARNING, logger="fedfm"):
        assert dp.session(0, np.arange(8), 2, seed=1, round_idx=3) is None
    assert "round 3: client 0 skipped" in caplog.text
    assert acc.epsilon(0) <= target and dp.skipped_total == 1
    assert not dp.exhausted()  # client 1 (q = 0.04) can still train
    assert dp.round_record() == {"dp_sgd_epsilon": acc.epsilon(0), "dp_sgd_skipped": 1}
    assert dp.round_record()["dp_sgd_skipped"] == 0


# -- (e) end to end -------------------------------------------------------------------------
def records(path):
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


def test_dp_sgd_run_reports_epsilon_and_still_learns_with_small_noise(tmp_path):
    over = {
        "federation.rounds": 4,
        "train.batch_size": 8,
        "eval.every": 2,
        "privacy.dp_sgd.enabled": True,
        "privacy.dp_sgd.noise_multiplier": 5e-4,  # Adam turns any noise into lr-sized steps: keep it small
        "privacy.dp_sgd.max_grad_norm": 1.0,
        "privacy.reproducible_noise": True,  # a fixed accuracy threshold: the same batches every time
    }
    s = fedfm.run(None, tiny_cls_overrides(tmp_path, **over))
    recs = records(tmp_path / "run")
    eps = [r["dp_sgd_epsilon"] for r in recs[1:]]
    assert [r["round"] for r in recs] == [0, 1, 2, 3, 4] and "dp_sgd_epsilon" not in recs[0]
    assert eps == sorted(eps) and 0 < eps[0]
    d = s["privacy"]["dp_sgd"]
    assert "epsilon" not in s["privacy"]  # no client-level DP in this run
    assert d["epsilon_max"] == eps[-1] and d["noise_multiplier"] == 5e-4 and d["max_grad_norm"] == 1.0
    assert d["delta"] == 1e-5 and d["skipped_participations"] == 0 and d["engine"] == "loop"  # full BERT
    trained = {c: v for c, v in d["per_client"].items() if v["steps"]}
    assert len(trained) == d["clients_trained"] and d["epsilon_mean"] == pytest.approx(
        np.mean([v["epsilon"] for v in trained.values()])
    )
    for v in trained.values():
        assert v["epsilon"] == pytest.approx(epsilon_for(5e-4, v["sampling_rate"], 1e-5, v["steps"]))
        assert v["steps"] == 8 * v["participations"]
    assert s["final_accuracy"] > 0.5, s  # chance is 1/3
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["privacy"]["dp_sgd"]["epsilon_max"] == eps[-1]


def test_target_epsilon_calibrates_sigma_and_skips_clients_past_it(tmp_path):
    over = {
        "model.method": "lora",
        "federation.rounds": 6,
        "train.local_steps": 2,
        "train.batch_size": 256,  # q = 1 for every client: equal plans, 3 participations each
        "eval.every": 0,
        "privacy.dp_sgd.enabled": True,
        "privacy.dp_sgd.target_epsilon": 3.0,
        "privacy.client_dp.enabled": True,  # composes with client-level DP
        "privacy.client_dp.noise_multiplier": 0.1,
    }
    s = fedfm.run(None, tiny_cls_overrides(tmp_path, **over))
    d, recs = s["privacy"]["dp_sgd"], records(tmp_path / "run")
    assert s["privacy"]["epsilon"] > 0  # client-level DP is reported alongside
    assert d["planned_participations"] == 3  # ceil(6 rounds x 3 / 6 clients)
    assert d["sampling_rate_min"] == 1.0
    assert epsilon_for(d["noise_multiplier"], 1.0, 1e-5, 3 * 2) == pytest.approx(3.0, rel=2e-3)
    assert all(v["epsilon"] <= 3.0 and v["participations"] <= 3 for v in d["per_client"].values())
    assert d["skipped_participations"] > 0 and d["engine"] == "hooks"
    assert sum(r["dp_sgd_skipped"] for r in recs) == d["skipped_participations"]
    assert sum(r["accepted"] for r in recs) == sum(v["participations"] for v in d["per_client"].values())


# -- (f) bad config ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override, fragment",
    [
        ("privacy.dp_sgd.enabled=true", "dp_sgd needs noise_multiplier or target_epsilon"),
        ("privacy.dp_sgd.max_grad_norm=0", "'privacy.dp_sgd.max_grad_norm'"),
        ("privacy.dp_sgd.noise_multiplier=-1", "'privacy.dp_sgd.noise_multiplier'"),
        ("privacy.dp_sgd.delta=1.5", "'privacy.dp_sgd.delta'"),
        ("privacy.dp_sgd.accountant=moments", "'privacy.dp_sgd.accountant'"),
        ("privacy.dp_sgd.clip=1", "unknown key 'privacy.dp_sgd.clip'"),
    ],
)
def test_bad_dp_sgd_config_is_one_line(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert fragment in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "extra, fragment",
    [
        ({"train.max_grad_norm": 1.0}, "train.max_grad_norm (batch clipping) cannot be combined with privacy.dp_sgd"),
        ({"privacy.dp_sgd.target_epsilon": 1e-4}, "privacy.dp_sgd: target_epsilon=0.0001 is below the epsilon of one"),
    ],
)
def test_refused_combinations_are_one_cli_line(tmp_path, extra, fragment):
    over = {"privacy.dp_sgd.enabled": True, "privacy.dp_sgd.noise_multiplier": 1.0, "federation.rounds": 1, **extra}
    res = CliRunner().invoke(app, ["run", *tiny_cls_overrides(tmp_path, **over)])
    lines = [x for x in res.output.strip().splitlines() if x.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and fragment in lines[0], res.output
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_distributed_example_is_the_bench_recipe_and_meets_every_condition(monkeypatch):
    from pathlib import Path

    from fedfm.server.compose import distributed_noise_share

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    from dp_tradeoff import jobs_for

    cfg = load_config("examples/dp_sgd_secagg.yaml")
    (job,) = jobs_for("cross-silo-secagg", [8.0], seed=0)
    assert cfg == load_config(None, job.overrides + ["name=dp_sgd_secagg"])  # the measured recipe, spelled out
    assert distributed_noise_share(cfg, {c: 171 for c in range(20)}) == pytest.approx(11 ** -0.5)
