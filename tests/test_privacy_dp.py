"""Client-level DP: clipping, noise, adaptive clipping and the accountant (values hand-checked)."""

import json
import math
from collections import OrderedDict

import pytest
import torch

from fedfm.algorithms import FedAvg, FedProx, MeanDeltaFold, Scaffold, ServerAvgM, ServerSGD, Update
from fedfm.privacy import (
    ClientDPFold,
    PrivacyAccountant,
    clip_by_global_norm,
    compute_epsilon,
    noise_multiplier_for,
    with_client_dp,
)


def od(**kw):
    return OrderedDict((k, torch.tensor(v, dtype=torch.float64)) for k, v in kw.items())


def upd(cid, **kw):
    return Update(client_id=cid, delta=od(**kw), num_examples=10 * (cid + 1))


# -- clipping -----------------------------------------------------------------
def test_clip_single_tensor_exact():
    clipped, norm = clip_by_global_norm(od(w=[3.0, 4.0]), 1.0)
    assert norm == pytest.approx(5.0)
    assert torch.allclose(clipped["w"], torch.tensor([0.6, 0.8], dtype=torch.float64))


def test_clip_is_joint_across_tensors():
    clipped, norm = clip_by_global_norm(od(a=[3.0], b=[4.0]), 1.0)
    assert norm == pytest.approx(5.0)
    assert clipped["a"].item() == pytest.approx(0.6) and clipped["b"].item() == pytest.approx(0.8)


def test_clip_below_norm_unchanged_and_input_untouched():
    d = od(a=[0.3], b=[0.4])
    clipped, norm = clip_by_global_norm(d, 1.0)
    assert norm == pytest.approx(0.5)
    assert torch.equal(clipped["a"], d["a"]) and torch.equal(clipped["b"], d["b"])
    big = OrderedDict(w=torch.tensor([3.0, 4.0]))
    clip_by_global_norm(big, 1.0)
    assert big["w"].tolist() == [3.0, 4.0]


# -- the fold -------------------------------------------------------------------
def test_sigma_zero_is_uniform_mean_of_clipped_deltas():
    g = od(a=[1.0], b=[2.0])
    fold = ClientDPFold(MeanDeltaFold(ServerSGD(1.0)), clip_norm=1.0, noise_multiplier=0.0, expected_clients=3)
    fold.start(g)
    fold.add(upd(0, a=[3.0], b=[4.0]))  # -> [0.6, 0.8]
    fold.add(upd(1, a=[0.0], b=[0.5]))  # unchanged
    fold.add(upd(2, a=[-6.0], b=[8.0]))  # norm 10 -> [-0.6, 0.8]
    new = fold.finish()
    # uniform (not example-weighted) mean: a = (0.6 + 0 - 0.6)/3, b = (0.8 + 0.5 + 0.8)/3
    assert new["a"].item() == pytest.approx(1.0 + 0.0)
    assert new["b"].item() == pytest.approx(2.0 + 2.1 / 3)
    s = fold.last_round
    assert s["fraction_clipped"] == pytest.approx(2 / 3)
    assert s["max_update_norm"] == pytest.approx(10.0)
    assert s["mean_update_norm"] == pytest.approx((5.0 + 0.5 + 10.0) / 3)
    assert s["noise_std"] == 0.0


def test_expected_vs_actual_denominator():
    g = od(w=[0.0])
    for denom, want in (("expected", 0.8 / 4), ("actual", 0.8 / 2)):
        fold = ClientDPFold(clip_norm=1.0, noise_multiplier=0.0, expected_clients=4, denominator=denom)
        fold.start(g)
        fold.add(upd(0, w=[0.5]))
        fold.add(upd(1, w=[0.3]))
        assert fold.finish()["w"].item() == pytest.approx(want)


def test_empirical_noise_std():
    sigma, C, m = 2.0, 0.5, 4.0
    fold = ClientDPFold(clip_norm=C, noise_multiplier=sigma, expected_clients=m, seed=123)
    draws = []
    for _ in range(500):  # 500 independent rounds, one coordinate each
        fold.start(od(w=[0.0]))
        fold.add(upd(0, w=[0.0]))
        draws.append(fold.finish()["w"].item())
    x = torch.tensor(draws)
    want = sigma * C / m
    assert fold.last_round["noise_std"] == pytest.approx(want)
    assert abs(x.std().item() - want) < 0.15 * want
    assert abs(x.mean().item()) < 4 * want / math.sqrt(500)


def test_noise_is_reproducible_and_differs_across_rounds():
    def run(seed):
        fold = ClientDPFold(clip_norm=1.0, noise_multiplier=1.0, expected_clients=1, seed=seed, reproducible=True)
        out = []
        for _ in range(2):
            fold.start(od(w=[0.0, 0.0]))  # same version every round: noise must still differ
            out.append(fold.finish()["w"].clone())  # empty round still gets noise
        return out

    a, b = run(7), run(7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(a[0], run(8)[0])
    assert a[0].abs().sum() > 0


def test_adaptive_clip_shrinks_and_grows_geometrically():
    eta, gamma, C0 = 0.2, 0.5, 1.0
    fold = ClientDPFold(
        clip_norm=C0, noise_multiplier=0.0, expected_clients=2, adaptive=True,
        target_quantile=gamma, clip_lr=eta, clipped_count_stddev=0.0,
    )
    for r in range(3):  # all norms far below C: b̄ = 1
        fold.start(od(w=[0.0]))
        fold.add(upd(0, w=[1e-4]))
        fold.add(upd(1, w=[-1e-4]))
        fold.finish()
        assert fold.clip_norm == pytest.approx(C0 * math.exp(-eta * (1 - gamma)) ** (r + 1))
    C = fold.clip_norm
    fold.start(od(w=[0.0]))
    fold.add(upd(0, w=[100.0]))
    fold.add(upd(1, w=[-100.0]))
    fold.finish()  # all above: b̄ = 0
    assert fold.clip_norm == pytest.approx(C * math.exp(eta * gamma))
    assert fold.last_round["clip_norm"] == pytest.approx(C)  # this round clipped with the old C


def test_adaptive_noise_split():
    z, m = 1.0, 100
    fold = ClientDPFold(noise_multiplier=z, expected_clients=m, adaptive=True)
    sb = m / 20
    assert fold.clipped_count_stddev == sb
    assert fold.delta_noise_multiplier == pytest.approx((z**-2 - (2 * sb) ** -2) ** -0.5)
    # the two mechanisms compose back to z: σ_Δ^-2 + (2σ_b)^-2 = z^-2
    assert fold.delta_noise_multiplier**-2 + (2 * sb) ** -2 == pytest.approx(z**-2)
    with pytest.raises(ValueError):
        ClientDPFold(noise_multiplier=1.0, expected_clients=10, adaptive=True, clipped_count_stddev=0.5)


def test_state_dict_round_trip():
    fold = ClientDPFold(clip_norm=2.0, noise_multiplier=0.0, expected_clients=1, adaptive=True)
    fold.start(od(w=[0.0]))
    fold.add(upd(0, w=[0.1]))
    fold.finish()
    st = json.loads(json.dumps(fold.state_dict()))
    other = ClientDPFold(clip_norm=2.0, noise_multiplier=0.0, expected_clients=1, adaptive=True)
    other.load_state_dict(st)
    assert other.clip_norm == fold.clip_norm and other.rounds == 1


def test_with_client_dp_keeps_optimizer_and_hook():
    opt = ServerAvgM(1.0, 0.9)
    algo = FedAvg(server_opt=opt, name="fedavgm")
    assert with_client_dp(algo, clip_norm=1.0, noise_multiplier=0.0, expected_clients=1) is algo
    assert isinstance(algo.fold, ClientDPFold) and algo.fold.inner.optimizer is opt  # wrapped, not replaced
    algo.start(od(w=[0.0]))
    algo.add(upd(0, w=[3.0]))
    assert algo.finish()["w"].item() == pytest.approx(1.0)  # clipped to 1, first AvgM step = Δ
    prox = with_client_dp(FedProx(mu=0.1), clip_norm=1.0, noise_multiplier=1.0, expected_clients=5)
    assert isinstance(prox.fold, ClientDPFold) and prox.hook_class.__name__ == "FedProxHook"
    with pytest.raises(ValueError):
        with_client_dp(Scaffold(4), clip_norm=1.0, noise_multiplier=1.0, expected_clients=2)


# -- the accountant -------------------------------------------------------------
def test_rdp_golden_opacus():
    acc = PrivacyAccountant(1.5, 0.04, 1e-5, kind="rdp")
    acc.step(2250)
    assert acc.steps == 2250
    assert acc.epsilon() == pytest.approx(7.3291, abs=0.05)


def test_pld_tighter_than_rdp():
    rdp = compute_epsilon(1.5, 0.04, 1e-5, 2250, "rdp")
    pld = compute_epsilon(1.5, 0.04, 1e-5, 2250, "pld")
    assert 0 < pld <= rdp
    assert pld == pytest.approx(6.77, abs=0.05)


def test_accountant_basics_and_state():
    acc = PrivacyAccountant(1.0, 0.1, 1e-5)
    assert acc.epsilon() == 0.0
    e10 = acc.epsilon_after(10)
    assert acc.steps == 0  # epsilon_after does not mutate
    acc.step()
    acc.step(9)
    assert acc.epsilon() == pytest.approx(e10)
    assert acc.epsilon_after(20) > e10
    st = json.loads(json.dumps(acc.state_dict()))
    other = PrivacyAccountant(5.0, 0.5, 1e-3)
    other.load_state_dict(st)
    assert other.steps == 10 and other.epsilon() == pytest.approx(e10)
    assert PrivacyAccountant(0.0, 0.1, 1e-5).epsilon_after(1) == math.inf
    with pytest.raises(ValueError):
        PrivacyAccountant(1.0, 0.0, 1e-5)


def test_noise_multiplier_for_round_trip_and_monotone():
    q, steps, delta = 0.01, 1000, 1e-5
    sigma = noise_multiplier_for(2.0, delta, q, steps)
    eps = compute_epsilon(sigma, q, delta, steps)
    assert eps <= 2.0 and eps == pytest.approx(2.0, rel=0.01)
    e = [compute_epsilon(s, q, delta, steps) for s in (0.6, 0.8, 1.0, 1.5, 3.0)]
    assert all(a > b for a, b in zip(e, e[1:]))
