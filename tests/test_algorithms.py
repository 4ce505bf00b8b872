"""Algorithms layer: every expected number below is worked out by hand in the comments."""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch

from fedfm.algorithms import (
    ALGORITHMS,
    FedAvg,
    FedProx,
    Scaffold,
    ServerAdagrad,
    ServerAdam,
    ServerAvgM,
    ServerYogi,
    Update,
    build_algorithm,
)
from fedfm.config.schema import AlgorithmConfig
from fedfm.errors import FedfmError


def T(*xs, dtype=torch.float32):
    return torch.tensor(xs, dtype=dtype)


def state(**tensors):
    return OrderedDict(tensors)


def upd(cid, n, **delta):
    return Update(client_id=cid, delta=OrderedDict(delta), num_examples=n)


def run_round(algo, global_state, updates, version=0):
    algo.start(global_state, version)
    for u in updates:
        algo.add(u)
    return algo.finish()


def close(a, b, tol=1e-6):
    return torch.allclose(a.double(), torch.as_tensor(b, dtype=torch.float64), atol=tol, rtol=0)


# --------------------------------------------------------------------------- FedAvg fold


def test_weighted_mean_exact():
    # (1*[1,2] + 3*[3,4]) / 4 = [10/4, 14/4] = [2.5, 3.5]; added to global [10, -1]
    g = state(w=T(10.0, -1.0))
    new = run_round(FedAvg(), g, [upd(0, 1, w=T(1.0, 2.0)), upd(1, 3, w=T(3.0, 4.0))])
    assert torch.equal(new["w"], T(12.5, 2.5))


def test_uniform_weighting():
    # ([1,2] + [3,4]) / 2 = [2, 3]
    g = state(w=T(0.0, 0.0))
    new = run_round(FedAvg(weighting="uniform"), g, [upd(0, 1, w=T(1.0, 2.0)), upd(1, 3, w=T(3.0, 4.0))])
    assert torch.equal(new["w"], T(2.0, 3.0))


def test_server_lr_scales_mean():
    # 0.5 * 2.5 = 1.25
    new = run_round(FedAvg(server_lr=0.5), state(w=T(1.0)), [upd(0, 1, w=T(1.0)), upd(1, 3, w=T(3.0))])
    assert torch.equal(new["w"], T(2.25))


def test_arrival_order_does_not_matter():
    # weights 1,2,5: (0.1 + 2*0.7 + 5*(-0.3)) / 8 = 0.0 / 8 = 0 ; (0.2 + 2*(-1.1) + 5*0.4)/8 = 0/8 = 0
    ups = [upd(0, 1, w=T(0.1, 0.2)), upd(1, 2, w=T(0.7, -1.1)), upd(2, 5, w=T(-0.3, 0.4))]
    g = state(w=T(1.0, 1.0))
    results = [run_round(FedAvg(), g, list(p))["w"] for p in itertools.permutations(ups)]
    for r in results:
        assert torch.equal(r, results[0])
    assert close(results[0], [1.0, 1.0])


def test_zero_example_update_is_skipped_under_example_weighting():
    g = state(w=T(0.0, 0.0))
    ups = [upd(0, 1, w=T(1.0, 2.0)), upd(1, 0, w=T(100.0, 100.0))]
    assert torch.equal(run_round(FedAvg(), g, ups)["w"], T(1.0, 2.0))
    # uniform: ([1,2] + [100,100]) / 2 = [50.5, 51]
    assert torch.equal(run_round(FedAvg(weighting="uniform"), g, ups)["w"], T(50.5, 51.0))


def test_finish_without_updates_returns_copies_of_global():
    g = state(w=T(1.0, 2.0), step=torch.tensor([7]))
    algo = FedAvg()
    for ups in ([], [upd(0, 0, w=T(5.0, 5.0))]):  # nothing, or only a 0-example update
        new = run_round(algo, g, ups)
        assert list(new) == ["w", "step"]
        assert torch.equal(new["w"], g["w"]) and torch.equal(new["step"], g["step"])
        assert new["w"].data_ptr() != g["w"].data_ptr()


def test_non_float_tensors_keep_global_value_and_dtypes_are_preserved():
    g = state(
        a=T(1.0, dtype=torch.bfloat16),
        step=torch.tensor([7]),
        b=T(2.0, dtype=torch.float64),
        mask=torch.tensor([True, False]),
    )
    d = state(a=T(0.5, dtype=torch.bfloat16), step=torch.tensor([100]), b=T(0.25, dtype=torch.float64),
              mask=torch.tensor([False, False]))
    new = run_round(FedAvg(), g, [Update(0, d, 4)])
    assert list(new) == ["a", "step", "b", "mask"]
    assert new["a"].dtype == torch.bfloat16 and new["a"].item() == 1.5
    assert new["b"].dtype == torch.float64 and new["b"].item() == 2.25
    assert torch.equal(new["step"], torch.tensor([7])) and torch.equal(new["mask"], torch.tensor([True, False]))


def test_inputs_are_not_modified():
    g = state(w=T(1.0, 2.0))
    d = T(3.0, 4.0)
    algo = build_algorithm(AlgorithmConfig(name="fedadam"), num_clients=2)
    for _ in range(2):
        run_round(algo, g, [upd(0, 1, w=d)])
    assert torch.equal(g["w"], T(1.0, 2.0)) and torch.equal(d, T(3.0, 4.0))


def test_fold_errors():
    algo = FedAvg()
    with pytest.raises(RuntimeError):
        algo.add(upd(0, 1, w=T(1.0)))
    algo.start(state(w=T(0.0, 0.0)))
    with pytest.raises(ValueError, match="missing"):
        algo.add(Update(0, OrderedDict(), 1))
    with pytest.raises(ValueError, match="shape"):
        algo.add(upd(0, 1, w=T(1.0)))
    with pytest.raises(ValueError, match="not in the global state"):
        algo.add(upd(0, 1, w=T(1.0, 1.0), extra=T(1.0)))
    with pytest.raises(ValueError, match="num_examples"):
        algo.add(upd(0, -1, w=T(1.0, 1.0)))


# --------------------------------------------------------------------------- FedOpt server steps
# All use tau = 0.1 (v0 = tau^2 = 0.01), beta1 = 0.9, beta2 = 0.99, lr = 1, x0 = [0, 0],
# round 1 mean delta D1 = [1, -2], round 2 D2 = [0.1, 0.1] (relative to the new global).


def two_rounds(algo, d2=True):
    x1 = run_round(algo, state(w=T(0.0, 0.0)), [upd(0, 1, w=T(1.0, -2.0))])["w"]
    if not d2:
        return x1, None
    x2 = run_round(algo, state(w=x1), [upd(0, 1, w=T(0.1, 0.1))])["w"]
    return x1, x2


def test_fedadam_one_step_by_hand():
    # m = 0.1 * [1,-2] = [0.1,-0.2]; v = 0.99*0.01 + 0.01*[1,4] = [0.0199, 0.0499]
    # x = m / (sqrt(v) + 0.1) = [0.1/(0.141067+0.1), -0.2/(0.223383+0.1)]
    x1, _ = two_rounds(FedAvg(server_opt=ServerAdam(1.0, 0.9, 0.99, 0.1)), d2=False)
    assert close(x1, [0.4148218161, -0.6184615491])
    # The same through the registry and the config schema.
    cfg = AlgorithmConfig(name="fedadam", server_lr=1.0, beta1=0.9, beta2=0.99, tau=0.1)
    x1r, _ = two_rounds(build_algorithm(cfg, 1), d2=False)
    assert torch.equal(x1r, x1)


def test_fedyogi_two_steps_by_hand():
    # step 1: D^2 = [1,4] > v0 = 0.01, sign(v0 - D^2) = -1 -> v1 = 0.01 + 0.01*[1,4] = [0.02, 0.05]
    #   m1 = [0.1, -0.2]; x1 = [0.1/(0.1*sqrt2 + 0.1), -0.2/(0.1*sqrt5 + 0.1)] = [sqrt2 - 1, -(sqrt5 - 1)/2]
    # step 2: D^2 = [0.01, 0.01] < v1, sign = +1 -> v2 = v1 - 0.01*0.01 = [0.0199, 0.0499]
    #   m2 = 0.9*m1 + 0.1*[0.1,0.1] = [0.1, -0.17]; x2 = x1 + m2/(sqrt(v2) + 0.1)
    x1, x2 = two_rounds(FedAvg(server_opt=ServerYogi(1.0, 0.9, 0.99, 0.1)))
    assert close(x1, [math.sqrt(2) - 1, -(math.sqrt(5) - 1) / 2])
    assert close(x2, [0.8290353785, -1.1437263054])


def test_fedadagrad_two_steps_by_hand():
    # v1 = 0.01 + [1,4] = [1.01, 4.01]; m1 = [0.1,-0.2]; x1 = [0.1/(sqrt(1.01)+0.1), -0.2/(sqrt(4.01)+0.1)]
    # v2 = v1 + 0.01 = [1.02, 4.02]; m2 = [0.1, -0.17]; x2 = x1 + [0.1/(sqrt(1.02)+0.1), -0.17/(sqrt(4.02)+0.1)]
    x1, x2 = two_rounds(FedAvg(server_opt=ServerAdagrad(1.0, 0.9, 0.99, 0.1)))
    assert close(x1, [0.0904987562, -0.0951249220])
    assert close(x2, [0.1805928645, -0.1758852562])


def test_fedavgm_two_steps_by_hand():
    # beta = 0.9, lr = 0.5. v1 = [1,-2], x1 = 0.5*v1 = [0.5, -1]
    # v2 = 0.9*[1,-2] + [0.1,0.1] = [1.0, -1.7]; x2 = x1 + 0.5*v2 = [1.0, -1.85]
    x1, x2 = two_rounds(FedAvg(server_opt=ServerAvgM(0.5, 0.9)))
    assert close(x1, [0.5, -1.0]) and close(x2, [1.0, -1.85])


def test_server_optimizer_skips_empty_round():
    # An empty round changes neither the model nor the momentum: x2 as in the two-step test.
    algo = FedAvg(server_opt=ServerAvgM(0.5, 0.9))
    x1 = run_round(algo, state(w=T(0.0, 0.0)), [upd(0, 1, w=T(1.0, -2.0))])["w"]
    assert torch.equal(run_round(algo, state(w=x1), [])["w"], x1)
    x2 = run_round(algo, state(w=x1), [upd(0, 1, w=T(0.1, 0.1))])["w"]
    assert close(x2, [1.0, -1.85])


# --------------------------------------------------------------------------- FedProx


def test_fedprox_hook_adds_proximal_gradient():
    # mu = 0.1, w = [1, 2], w_g = [0.5, 3]: grad [0.1, 0.1] + 0.1*[0.5, -1] = [0.15, 0.0]
    # v has no data gradient: grad = 0.1*(4 - 2) = [0.2]
    algo = FedProx(mu=0.1)
    g = state(w=T(0.5, 3.0), v=T(2.0))
    b = algo.broadcast(g, 0)
    params = OrderedDict(w=torch.nn.Parameter(T(0.5, 3.0)), v=torch.nn.Parameter(T(2.0)))
    hook = algo.client_hook(b, params, {})
    g["w"].fill_(-100.0)  # the runtime may reuse/alias the broadcast tensors: the hook keeps a copy
    with torch.no_grad():
        params["w"].copy_(T(1.0, 2.0))
        params["v"].copy_(T(4.0))
    params["w"].grad = T(0.1, 0.1)
    hook.on_gradients()
    assert close(params["w"].grad, [0.15, 0.0]) and close(params["v"].grad, [0.2])
    assert hook.finish(3, 0.1) == {}


# --------------------------------------------------------------------------- SCAFFOLD


def test_scaffold_hook_correction_and_option_ii_control():
    # c = [1, -1], c_i = [0.25, 0.5] -> correction c - c_i = [0.75, -1.5]
    # local loss 0.5||w||^2 (grad = w), x = [1, 2], plain SGD lr 0.5, K = 2:
    #   g0 = [1, 2] + corr = [1.75, 0.5]      -> w1 = [0.125, 1.75]
    #   g1 = [0.125, 1.75] + corr = [0.875, 0.25] -> w2 = [-0.3125, 1.625]
    # (x - y)/(K lr) = [1.3125, 0.375]; c_i+ = c_i - c + that = [0.5625, 1.875]
    #   (= the mean of the uncorrected gradients [1,2], [0.125,1.75], as option II should give)
    # control_delta = c_i+ - c_i = [0.3125, 1.375]
    algo = Scaffold(num_clients=4)
    algo.fold.control = OrderedDict(w=T(1.0, -1.0))
    g = state(w=T(1.0, 2.0))
    b = algo.broadcast(g, 0)
    assert torch.equal(b.extras["control"]["w"], T(1.0, -1.0))
    client_state = {"scaffold.control": OrderedDict(w=T(0.25, 0.5))}
    w = torch.nn.Parameter(b.state["w"].clone())
    hook = algo.client_hook(b, OrderedDict(w=w), client_state)
    seen = []
    for _ in range(2):
        w.grad = None
        (0.5 * (w**2).sum()).backward()
        hook.on_gradients()
        seen.append(w.grad.clone())
        with torch.no_grad():
            w -= 0.5 * w.grad
    assert close(seen[0], [1.75, 0.5]) and close(seen[1], [0.875, 0.25])
    assert close(w.detach(), [-0.3125, 1.625])
    extras = hook.finish(2, 0.5)
    assert close(extras["control_delta"]["w"], [0.3125, 1.375])
    assert close(client_state["scaffold.control"]["w"], [0.5625, 1.875])


def test_scaffold_first_round_zero_controls():
    # c = c_i = 0: no correction; K = 1, lr = 0.5, x = [1], grad = x -> y = 0.5
    # c_i+ = 0 - 0 + (1 - 0.5)/(1*0.5) = 1 = the gradient at x
    algo = Scaffold(num_clients=2)
    g = state(w=T(1.0))
    algo.start(g)
    b = algo.broadcast(g, 0)
    cs: dict = {}
    w = torch.nn.Parameter(T(1.0))
    hook = algo.client_hook(b, OrderedDict(w=w), cs)
    (0.5 * (w**2).sum()).backward()
    hook.on_gradients()
    assert close(w.grad, [1.0])
    with torch.no_grad():
        w -= 0.5 * w.grad
    assert close(hook.finish(1, 0.5)["control_delta"]["w"], [1.0])
    assert close(cs["scaffold.control"]["w"], [1.0])


def test_scaffold_server_control_update_uses_S_over_N():
    # N = 4. Round 1: dy [1,1] (n=1), [5,5] (n=3) -> x = 0 + [4, 4] (example weighted)
    #   dc [1,2], [3,0] -> uniform mean [2, 1]; c = 0 + (2/4)*[2,1] = [1, 0.5]
    # Round 2: one real update dc [2,2] (+ a 0-example update, skipped): c = [1,0.5] + (1/4)[2,2] = [1.5, 1]
    algo = Scaffold(num_clients=4)
    g0 = state(w=T(0.0, 0.0), step=torch.tensor([3]))

    def su(cid, n, dy, dc):
        return Update(cid, OrderedDict(w=dy), n, extras={"control_delta": OrderedDict(w=dc)})

    algo.start(g0)
    b0 = algo.broadcast(g0, 0)
    assert list(b0.extras["control"]) == ["w"]  # no control for non-float tensors
    algo.add(su(0, 1, T(1.0, 1.0), T(1.0, 2.0)))
    algo.add(su(1, 3, T(5.0, 5.0), T(3.0, 0.0)))
    g1 = algo.finish()
    assert torch.equal(g1["w"], T(4.0, 4.0)) and torch.equal(g1["step"], torch.tensor([3]))
    assert close(algo.broadcast(g1, 1).extras["control"]["w"], [1.0, 0.5])
    assert torch.equal(b0.extras["control"]["w"], T(0.0, 0.0))  # an earlier broadcast is not changed

    algo.start(g1, 1)
    algo.add(su(2, 2, T(0.0, 0.0), T(2.0, 2.0)))
    algo.add(Update(3, OrderedDict(w=T(9.0, 9.0)), 0))  # 0 examples: skipped, not in |S|
    algo.finish()
    assert close(algo.broadcast(g1, 2).extras["control"]["w"], [1.5, 1.0])


def test_scaffold_update_without_control_delta_is_rejected():
    algo = Scaffold(num_clients=2)
    algo.start(state(w=T(0.0)))
    with pytest.raises(ValueError, match="control_delta"):
        algo.add(upd(0, 1, w=T(1.0)))


# --------------------------------------------------------------------------- end to end on quadratics
# Client i has loss 0.5||w - t_i||^2 and runs K_i plain-SGD steps (lr 0.1) from the global model;
# every client holds the same number of examples, so the federated optimum is mean(t_i) = [0, 1].
TARGETS = [T(1.0, 0.0), T(0.0, 2.0), T(-1.0, 1.0)]
STEPS = [1, 5, 20]
LR = 0.1


def federate(algo, rounds):
    g = state(w=T(3.0, -3.0))
    client_states = [{} for _ in TARGETS]
    w = torch.nn.Parameter(torch.zeros(2))
    for r in range(rounds):
        algo.start(g, r)
        for i, (t, k) in enumerate(zip(TARGETS, STEPS)):
            b = algo.broadcast(g, r)
            with torch.no_grad():
                w.copy_(b.state["w"])
            hook = algo.client_hook(b, OrderedDict(w=w), client_states[i])
            for _ in range(k):
                w.grad = None
                (0.5 * ((w - t) ** 2).sum()).backward()
                hook.on_gradients()
                with torch.no_grad():
                    w -= LR * w.grad
            extras = hook.finish(k, LR)
            u = Update(i, OrderedDict(w=w.detach() - b.state["w"]), 10, extras=extras, base_version=r)
            algo.add(u)
        g = algo.finish()
    return g["w"]


def test_fedavg_drifts_with_unequal_local_steps():
    # After K steps y_i = t_i + a_i (x - t_i), a_i = 0.9^K_i; FedAvg's fixed point is
    # x* = sum((1 - a_i) t_i) / sum(1 - a_i) with 1 - a = [0.1, 0.40951, 0.87842], i.e. not [0, 1].
    a = [1 - 0.9**k for k in STEPS]
    fixed = [sum(ai * float(t[j]) for ai, t in zip(a, TARGETS)) / sum(a) for j in range(2)]
    x = federate(FedAvg(), 150)
    assert close(x, fixed, tol=1e-4)
    assert (x - T(0.0, 1.0)).norm() > 0.3


def test_scaffold_converges_to_the_mean_optimum():
    x = federate(Scaffold(num_clients=3), 150)
    assert (x - T(0.0, 1.0)).abs().max() < 1e-3


# --------------------------------------------------------------------------- registry


def test_registry_builds_every_name():
    builtin = {"fedavg", "fedprox", "scaffold", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "diloco"}
    assert set(ALGORITHMS) >= builtin  # a new algorithm file adds its own name
    for name in ALGORITHMS:
        algo = build_algorithm(AlgorithmConfig(name=name), num_clients=5)
        assert algo.name == name
        assert algo.capabilities == ALGORITHMS.get(name).capabilities
    assert build_algorithm(AlgorithmConfig(name="scaffold"), 7).fold.num_clients == 7
    assert build_algorithm(AlgorithmConfig(name="fedprox", mu=0.3), 1).mu == 0.3


def test_registry_unknown_name_lists_valid_names():
    with pytest.raises(FedfmError, match="fedadam"):
        build_algorithm(SimpleNamespace(name="fedsgdx"), 3)
