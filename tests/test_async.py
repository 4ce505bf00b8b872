"""Buffered asynchronous training (FedBuff, FedAsync) on the virtual clock."""

import json
import math
from collections import OrderedDict

import pytest
import torch

import fedfm
from fedfm.algorithms.fedavg import FedAvg
from fedfm.algorithms.staleness import staleness_weight
from fedfm.config.schema import AsyncConfig, DevicesConfig
from fedfm.errors import FedfmError
from fedfm.drivers.asynchronous import AsyncEngine
from fedfm.drivers.devices import Fleet
from fedfm.drivers.simulation import simulation

from test_devices import ConstantClients, clients, profile
from test_end_to_end import tiny_cls_overrides

pytestmark = pytest.mark.usefixtures("one_thread")


def test_staleness_weights_match_their_formulas():
    assert staleness_weight(0) == 1.0
    assert staleness_weight(3) == pytest.approx(0.5)  # FedBuff: 1 / sqrt(1 + 3)
    assert staleness_weight(3, "polynomial", exponent=1.0) == pytest.approx(0.25)
    assert staleness_weight(4, "hinge", hinge_a=10, hinge_b=4) == 1.0
    assert staleness_weight(6, "hinge", hinge_a=10, hinge_b=4) == pytest.approx(1 / 21)
    assert staleness_weight(9, "constant") == 1.0
    with pytest.raises(ValueError):
        staleness_weight(-1)


def two_client_engine(method, mixing=0.6, max_staleness=None):
    """Client 'fast' takes 1 s and sends +1; client 'slow' takes 3 s and sends +10; both always busy."""
    fleet = Fleet(DevicesConfig(step_seconds=1.0, profiles=[profile("fast", share=1), profile("slow", share=1, speed=1 / 3)]),
                  2, seed=0)
    trainer = ConstantClients(lambda c: {"fast": 1.0, "slow": 10.0}[fleet.profile(c).name])
    cfg = AsyncConfig(enabled=True, method=method, buffer_size=1, concurrency=2, mixing=mixing, max_staleness=max_staleness)
    sim = simulation(trainer, FedAvg(), clients(2), 2, 0, OrderedDict(w=torch.zeros(3)), fleet=fleet, asynchronous=cfg)
    return sim, AsyncEngine(sim, cfg)


def test_fedbuff_folds_arrivals_in_virtual_time_order_weighted_by_staleness():
    sim, engine = two_client_engine("fedbuff")
    recs = [engine.step(k) for k in range(1, 5)]
    # t=1 fast (from v0), t=2 fast (v1), t=3 slow (v0, staleness 2) before fast (v2, staleness 1)
    assert [r["virtual_s"] for r in recs] == pytest.approx([1.0, 2.0, 3.0, 3.0])
    assert [r["staleness_max"] for r in recs] == [0, 0, 2, 1]
    expect = 1 + 1 + 10 / math.sqrt(3) + 1 / math.sqrt(2)
    assert torch.allclose(sim.server.global_state["w"], torch.full((3,), expect))
    assert sim.server.version == 4


def test_fedasync_mixes_the_client_model_into_the_current_one():
    sim, engine = two_client_engine("fedasync", mixing=0.5)
    for k in range(1, 5):
        engine.step(k)
    w1 = 0.5 * 1.0  # x + a (x_base + delta - x) with x = x_base = 0
    w2 = w1 + 0.5 * (w1 + 1.0 - w1)
    w3 = w2 + 0.5 / math.sqrt(3) * (0.0 + 10.0 - w2)  # the slow client started from v0 = 0
    w4 = w3 + 0.5 / math.sqrt(2) * (w2 + 1.0 - w3)  # the fast client started from v2
    assert torch.allclose(sim.server.global_state["w"], torch.full((3,), w4), atol=1e-6)
    assert sim.server.bases.keys() <= {3, 4}  # versions no client needs any more are dropped


def test_updates_staler_than_the_limit_are_rejected_and_logged():
    sim, engine = two_client_engine("fedbuff", max_staleness=1)
    recs = [engine.step(k) for k in range(1, 4)]
    assert recs[2]["stale"] == 1  # the slow client (staleness 2) is dropped, the fast one folded instead
    assert sim.server.rejected[0]["reason"].startswith("stale")
    assert torch.allclose(sim.server.global_state["w"], torch.full((3,), 3.0))


def test_a_dropped_client_frees_its_slot_and_the_step_still_fills_its_buffer():
    fleet = Fleet(DevicesConfig(profiles=[profile("ok", share=1), profile("flaky", share=1, dropout=0.999)]), 4, seed=0)
    trainer = ConstantClients(lambda c: 1.0)
    cfg = AsyncConfig(enabled=True, buffer_size=2, concurrency=3, staleness="constant")
    sim = simulation(trainer, FedAvg(), clients(4), 2, 0, OrderedDict(w=torch.zeros(2)), fleet=fleet, asynchronous=cfg)
    engine = AsyncEngine(sim, cfg)
    recs = [engine.step(k) for k in range(1, 4)]
    assert all(r["accepted"] == 2 for r in recs) and sum(r["dropped"] for r in recs) > 0
    assert torch.allclose(sim.server.global_state["w"], torch.full((2,), 3.0))


def test_an_async_run_learns_and_reports_staleness_and_virtual_time(tmp_path):
    extra = {"asynchronous.enabled": "true", "asynchronous.buffer_size": 2, "asynchronous.concurrency": 3,
             "federation.rounds": 9, "devices.profiles": "[{name: fast, share: 0.5}, {name: slow, share: 0.5, speed: 0.25}]"}
    summary = fedfm.run(None, tiny_cls_overrides(tmp_path, **extra))
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["final_accuracy"] > 0.6, summary  # chance is 1/3
    clock = [r["virtual_s"] for r in recs[1:]]
    assert clock == sorted(clock) and clock[-1] == summary["virtual_s"] > 0
    assert summary["asynchronous"]["staleness_max"] >= 1  # slow clients do arrive late
    assert all(r["accepted"] == 2 for r in recs[1:])


@pytest.mark.parametrize("extra, message", [
    ({"privacy.client_dp.enabled": "true", "privacy.client_dp.noise_multiplier": 1.0}, "differential privacy"),
    ({"asynchronous.method": "fedasync", "algorithm.name": "fedavgm"}, "fedasync"),
    ({"asynchronous.concurrency": 50}, "exceeds"),
    ({"attack.name": "alie", "attack.fraction": 0.2}, "colludes"),
    # not ASYNC_SAFE: a stale update's control-variate delta would corrupt the server's c
    ({"algorithm.name": "scaffold"}, "cannot serve algorithm.name=scaffold"),
])
def test_unsupported_async_combinations_fail_with_one_line(tmp_path, extra, message):
    with pytest.raises(FedfmError, match=message) as err:
        fedfm.run(None, tiny_cls_overrides(tmp_path, **{"asynchronous.enabled": "true", **extra}))
    assert "\n" not in str(err.value)
