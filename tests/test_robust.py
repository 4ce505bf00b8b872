"""Robust aggregation rules, the robust fold and attack simulators, against hand-computed values."""

from __future__ import annotations

import math
from collections import OrderedDict
from statistics import NormalDist

import pytest
import torch

from fedfm.algorithms.base import Update
from fedfm.algorithms.fedavg import MeanDeltaFold
from fedfm.algorithms.fedopt import ServerAvgM, ServerSGD
from fedfm.errors import FedfmError
from fedfm.robustness import aggregators as agg
from fedfm.robustness import attacks as atk


def T(rows):
    return torch.tensor(rows, dtype=torch.float32)


def close(a, b, tol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), atol=tol)


# -- rules ---------------------------------------------------------------------
def test_median_odd_and_even():
    assert close(agg.coordinate_median(T([[1, 10], [2, 20], [100, -5]])), [2, 10])
    assert close(agg.coordinate_median(T([[1], [2], [3], [10]])), [2.5])


def test_trimmed_mean_one_fifth_of_five():
    x = T([[1, -1], [2, -50], [3, 0], [4, 2], [100, 1]])
    # column 0 drops 1 and 100 -> mean(2,3,4)=3; column 1 drops -50 and 2 -> mean(-1,0,1)=0
    assert close(agg.trimmed_mean(x, 0.2), [3, 0])
    assert close(agg.trimmed_mean(x, 0.0), x.mean(0))
    with pytest.raises(ValueError):
        agg.trimmed_mean(x, 0.5)


# 4 clustered points and one far outlier. Squared distances: a-b 1, a-c 1, b-c 2,
# d to each of a, b, c 0.5. With n=5, f=1 Krum sums the n-f-2=2 nearest:
# a: 0.5+1=1.5, b: 0.5+1=1.5, c: 0.5+1=1.5, d: 0.5+0.5=1.0, e: huge.
KRUM_X = T([[0, 0], [1, 0], [0, 1], [0.5, 0.5], [100, 100]])


def test_krum_scores_and_pick():
    s = agg.krum_scores(KRUM_X, 1)
    assert close(s[:4], [1.5, 1.5, 1.5, 1.0])
    assert s[4] > 1e4
    assert agg.krum_select(KRUM_X, 1) == [3]
    assert close(agg.krum(KRUM_X, 1), [0.5, 0.5])


def test_multi_krum_averages_m_best():
    # m=4 keeps a, b, c, d: mean = (1.5, 1.5) / 4
    assert close(agg.multi_krum(KRUM_X, 1, 4), [0.375, 0.375])
    assert close(agg.multi_krum(KRUM_X, 1, 1), agg.krum(KRUM_X, 1))
    assert close(agg.multi_krum(KRUM_X, 1), [0.375, 0.375])  # default m = n - f = 4


def test_krum_and_bulyan_constraints():
    with pytest.raises(ValueError, match=r"n > 2f \+ 2"):
        agg.krum(KRUM_X[:4], 1)  # 4 > 4 is false
    with pytest.raises(ValueError, match=r"n >= 4f \+ 3"):
        agg.bulyan(torch.zeros(6, 2), 1)
    agg.bulyan(torch.zeros(7, 2), 1)  # 7 >= 7 is fine


def test_bulyan_n7_f1_with_huge_outlier():
    # theta = 5, beta = 3. Iterated Krum picks 3, 4, 2, 5, 1 (hand-traced);
    # median of the selection = 3, its 3 closest values 2, 3, 4 -> 3.
    x = T([[1], [2], [3], [4], [5], [6], [1e6]])
    out = agg.bulyan(x, 1)
    assert close(out, [3.0])
    assert 1 <= float(out) <= 6
    # Asymmetric case (tells beta = 3 apart from a plain mean of the selection):
    # iterated Krum selects 2, 4, 1, 8, 0 in that order; median 2; the three
    # closest are 2, 1 and 4 (4 ties with 0 and was selected first) -> 7/3.
    assert close(agg.bulyan(T([[0], [1], [2], [4], [8], [9], [1e6]]), 1), [7 / 3])


def test_norm_bounding_clips_then_weighted_mean():
    x = T([[3, 4], [0.3, 0.4]])  # norms 5 and 0.5; M = 1 clips the first to (0.6, 0.8)
    assert close(agg.norm_bounded_mean(x, torch.tensor([1.0, 1.0]), 1.0), [0.45, 0.6])
    assert close(agg.norm_bounded_mean(x, torch.tensor([1.0, 3.0]), 1.0), [0.375, 0.5])


def test_fltrust_zero_weight_for_opposite_and_rescales():
    g0 = torch.tensor([1.0, 0.0])
    x = T([[2, 0], [-5, 0], [0, 3], [3, 3]])
    r = 1 / math.sqrt(2)
    assert close(agg.fltrust_scores(x, g0), [1, 0, 0, r])
    # (1*(1,0) + r*(r,r)) / (1 + r) -- magnitudes rescaled to ||g0|| = 1
    expected = [1.5 / (1 + r), 0.5 / (1 + r)]
    assert close(agg.fltrust(x, g0), expected)
    assert close(agg.fltrust(T([[-1, 0], [-2, 0]]), g0), [0, 0])  # all trust zero -> zero update


# -- attacks ----------------------------------------------------------------------
def D(*vals, dtype=torch.float32):
    return OrderedDict(w=torch.tensor(vals, dtype=dtype))


def test_sign_flip_and_replacement():
    assert close(atk.sign_flip(D(1, -2), 2.0)["w"], [-2, 4])
    assert close(atk.model_replacement(D(1, -2), num_clients=10)["w"], [10, -20])
    assert atk.replacement_factor(10, 0.5) == 20
    assert close(atk.model_replacement(D(1, -2), 10, server_lr=0.5)["w"], [20, -40])
    out = atk.sign_flip(D(1, 2, dtype=torch.bfloat16))
    assert out["w"].dtype == torch.bfloat16


def test_gaussian_noise_replaces_delta():
    g = torch.Generator().manual_seed(0)
    out = atk.gaussian_noise(OrderedDict(w=torch.full((20000,), 5.0)), sigma=3.0, generator=g)["w"]
    assert abs(float(out.mean())) < 0.1 and abs(float(out.std()) - 3.0) < 0.1


def test_alie_formula_n10_f2():
    # s = floor(10/2 + 1) - 2 = 4; z = Phi^-1((10 - 4) / 10) = Phi^-1(0.6) ~ 0.253347
    z = atk.alie_z(10, 2)
    assert z == pytest.approx(NormalDist().inv_cdf(0.6)) and z == pytest.approx(0.253347, abs=1e-6)
    benign = [D(float(v), -float(v)) for v in range(1, 9)]  # 8 benign: mean 4.5, sample std sqrt(6)
    out = atk.alie(benign, num_byzantine=2)["w"]  # n = 8 + 2 = 10
    expected = 4.5 - z * math.sqrt(6)
    assert close(out, [expected, -4.5 - z * math.sqrt(6)])  # mu - z*sigma in both columns


def test_ipm():
    assert close(atk.ipm([D(1, 2), D(3, 4)], epsilon=0.5)["w"], [-1, -1.5])


def test_data_poisoning_helpers():
    assert atk.flip_labels([0, 1, 2], 3) == [1, 2, 0]
    assert atk.flip_labels([0, 1, 2], 3, mode="reverse") == [2, 1, 0]
    assert torch.equal(atk.flip_labels(torch.tensor([0, 3]), 4, "reverse"), torch.tensor([3, 0]))
    assert atk.add_trigger(["hello world"]) == ["cf hello world"]
    assert atk.add_trigger(["a b"], "mn", "end") == ["a b mn"]
    assert "cf" in atk.add_trigger(["a b c"], position="random")[0].split()
    # non-target examples are 0, 2, 3; predicted target on 0 and 3 -> 2/3
    assert atk.backdoor_success_rate([0, 0, 1, 0], 0, [1, 0, 1, 2]) == pytest.approx(2 / 3)


def test_choose_malicious_and_dispatch():
    m = atk.choose_malicious(10, 0.3, seed=1)
    assert m == sorted(m) and len(set(m)) == 3 and all(0 <= i < 10 for i in m)
    assert m == atk.choose_malicious(10, 0.3, seed=1)
    assert atk.choose_malicious(10, 0.0) == []
    assert close(atk.apply_model_attack("sign_flip", D(1, 2), scale=3)["w"], [-3, -6])
    assert close(atk.apply_model_attack("ipm", D(0, 0), [D(2, 2)], epsilon=1)["w"], [-2, -2])
    with pytest.raises(FedfmError, match="sign_flip"):
        atk.apply_model_attack("nope", D(1))
    a = atk.Attack(name="alie", fraction=0.2, seed=0)
    assert a.colluding and len(a.malicious(10)) == 2
    with pytest.raises(FedfmError):
        atk.Attack(name="bogus")


# -- the fold, end to end ------------------------------------------------------------
def _round(fold, n_honest=9, n_bad=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = OrderedDict(w=torch.zeros(2, dtype=torch.bfloat16), step=torch.tensor(7))
    honest = [OrderedDict(w=(1 + 0.1 * torch.randn(2, generator=g)).to(torch.bfloat16),
                          step=torch.tensor(0)) for _ in range(n_honest)]
    bad = [atk.sign_flip(d, 10.0) for d in honest[:n_bad]]
    fold.start(state, version=3)
    for i, d in enumerate(honest + bad):
        fold.add(Update(client_id=i, delta=d, num_examples=10))
    new = fold.finish()
    assert list(new) == ["w", "step"] and new["w"].dtype == torch.bfloat16 and int(new["step"]) == 7
    assert state["w"].abs().sum() == 0  # the global state was not modified
    return new["w"].float()


@pytest.mark.parametrize(
    "name,kw",
    [
        ("median", {}),
        ("trimmed_mean", {"trim_fraction": 0.2}),
        ("krum", {"num_byzantine": 2}),
        ("multi_krum", {"num_byzantine": 2}),
        ("bulyan", {"num_byzantine": 2}),  # 11 >= 4*2 + 3
        ("norm_bound", {"norm_bound": 1.5}),
        ("fltrust", {"server_update": lambda g, v: OrderedDict(w=torch.tensor([1.0, 1.0]), step=torch.tensor(0))}),
    ],
)
def test_robust_folds_resist_sign_flipping(name, kw):
    mean = _round(agg.RobustFold(lambda x, w: x.mean(0)))
    assert (mean - 1).abs().max() > 1.5  # the plain mean is dragged to about -1
    out = _round(agg.build_robust_fold(name, **kw))
    assert (out - 1).abs().max() < 0.5, out


def test_fold_uses_server_optimizer_and_edge_cases():
    fold = agg.build_robust_fold("median", ServerSGD(0.5))
    state = OrderedDict(w=torch.tensor([1.0, 1.0]))
    fold.start(state)
    for i, v in enumerate([[2, 4], [4, 8], [100, -100]]):
        fold.add(Update(client_id=i, delta=OrderedDict(w=torch.tensor(v, dtype=torch.float32)), num_examples=1))
    assert fold.num_folded == 3
    assert close(fold.finish()["w"], [1 + 0.5 * 4, 1 + 0.5 * 4])  # median (4, 4), half step
    with pytest.raises(RuntimeError):
        fold.add(Update(client_id=0, delta=state, num_examples=1))
    fold.start(state)
    out = fold.finish()  # nothing folded: a copy of the global state
    assert close(out["w"], [1, 1]) and out["w"] is not state["w"]
    ex = agg.build_robust_fold("norm_bound", norm_bound=10.0, weighting="examples")
    ex.start(state)
    assert ex.add(Update(client_id=0, delta=state, num_examples=0)) is False
    with pytest.raises(ValueError, match="shape"):
        ex.add(Update(client_id=1, delta=OrderedDict(w=torch.zeros(3)), num_examples=1))


def test_fold_raises_krum_constraint_at_finish():
    fold = agg.build_robust_fold("krum", num_byzantine=1)
    fold.start(OrderedDict(w=torch.zeros(1)))
    for i in range(4):
        fold.add(Update(client_id=i, delta=OrderedDict(w=torch.ones(1)), num_examples=1))
    with pytest.raises(ValueError, match="2f"):
        fold.finish()


def test_a_robust_rule_wraps_the_algorithms_fold_which_takes_its_own_step():
    """The median goes to FedAvgM's fold as one update: its momentum runs on the medians, across rounds."""
    inner = MeanDeltaFold(ServerAvgM(lr=1.0, momentum=0.5))
    fold = agg.build_robust_fold("median", inner)
    assert isinstance(fold, agg.RobustFold) and fold.inner is inner and fold.optimizer is inner.optimizer
    x = OrderedDict(w=torch.tensor([0.0, 0.0]))
    for deltas, want in (([[1, 2], [3, 4], [50, -50]], [3, 2]),  # medians m1 = (3, 2); v = m1
                         ([[1, 0], [1, 0], [-9, 9]], [3 + 2.5, 2 + 1])):  # m2 = (1, 0); v = 0.5 v + m2
        fold.start(x)
        for i, d in enumerate(deltas):
            fold.add(Update(client_id=i, delta=OrderedDict(w=T(d)), num_examples=1 + i))
        x = fold.finish()
        assert close(x["w"], want), x
    assert agg.build_robust_fold("mean", inner) is inner  # no rule: the algorithm's own fold


def test_attacks_ask_their_entry_not_their_name():
    assert not atk.Attack().active and atk.Attack().malicious(10) == []
    a = atk.Attack("ipm", fraction=0.3, epsilon=0.5, sigma=2.0)  # sigma belongs to gaussian: kept out
    assert a.active and a.colluding and not a.poisons_data and a.epsilon == 0.5
    with pytest.raises(AttributeError):
        a.sigma
    with pytest.raises(FedfmError, match="unknown option 'sigmaa'"):
        atk.Attack("gaussian", sigmaa=1.0)
    with pytest.raises(FedfmError, match="attack.poison_fraction"):
        atk.Attack("backdoor", poison_fraction=0)
    assert atk.Attack("backdoor").poison_fraction == 0.5 and atk.Attack("backdoor").poisons_data


def test_registry_errors():
    with pytest.raises(FedfmError, match="bulyan, fltrust, krum, mean, median, multi_krum, norm_bound, trimmed_mean"):
        agg.build_robust_fold("geomed")
    with pytest.raises(FedfmError, match="robust.norm_bound: Input should be greater than 0"):
        agg.build_robust_fold("norm_bound", norm_bound=0)
    with pytest.raises(FedfmError, match="robust.trim_fraction"):
        agg.build_robust_fold("trimmed_mean", trim_fraction=0.5)
    with pytest.raises(FedfmError, match="has no option 'trim_fraction'"):
        agg.build_robust_fold("median", trim_fraction=0.2)
    with pytest.raises(FedfmError, match="server_update"):
        agg.build_robust_fold("fltrust")
