"""Heterogeneous clients: device profiles, the virtual clock, drop-outs, deadlines and HetLoRA ranks."""

from collections import OrderedDict

import numpy as np
import pytest
import torch

import fedfm
from fedfm.algorithms.base import Broadcast, Update
from fedfm.algorithms.fedavg import FedAvg
from fedfm.config.schema import DeviceProfile, DevicesConfig, LoraConfig, ModelConfig, TrainConfig
from fedfm.errors import FedfmError
from fedfm.models import build_model
from fedfm.models.state import get_state
from fedfm.client.hetlora import HetRankTrainer
from fedfm.models import lora_rank
from fedfm.client.data import Client
from fedfm.client.trainer import LocalTrainer
from fedfm.drivers.devices import Fleet, assign_profiles
from fedfm.drivers.simulation import simulation

from tables import random_table
from test_end_to_end import tiny_cls_overrides

pytestmark = pytest.mark.usefixtures("one_thread")


class ConstantClients:
    """Test double for the client side: client ``c`` returns ``delta = value(c)`` on every tensor.

    It stands in for local training so that the runtime's arithmetic (clock,
    drop-outs, deadlines, folds) can be checked by hand.
    """

    def __init__(self, value, steps=1):
        self.value = value
        self.cfg = TrainConfig(local_steps=steps, batch_size=1)

    def local_update(self, algo, broadcast, client, round_idx):
        delta = OrderedDict((k, torch.full_like(v, float(self.value(client.cid)))) for k, v in broadcast.state.items())
        return Update(client.cid, delta, num_examples=1, metrics={"train_loss": 0.0, "steps": float(self.cfg.local_steps)},
                      base_version=broadcast.version)


def clients(n):
    return [Client(cid=c, train_idx=np.arange(1), test_idx=np.arange(0)) for c in range(n)]


def profile(name, **kw):
    return DeviceProfile(name=name, share=kw.pop("share", 1.0), **kw)


# -- profiles and the clock ----------------------------------------------------------
def test_profiles_are_assigned_by_largest_remainder_of_the_shares():
    of = assign_profiles([0.5, 0.25, 0.25], 20, seed=0)
    assert np.bincount(of).tolist() == [10, 5, 5]
    assert np.bincount(assign_profiles([1, 1, 1], 10, seed=0)).tolist() == [4, 3, 3]
    assert (assign_profiles([1, 1, 1], 10, seed=3) == assign_profiles([1, 1, 1], 10, seed=3)).all()
    assert not (assign_profiles([1, 1], 40, seed=1) == assign_profiles([1, 1], 40, seed=2)).all()


def test_durations_are_steps_at_the_device_speed_plus_payloads_over_its_link():
    fleet = Fleet(DevicesConfig(step_seconds=0.5, profiles=[profile("p", speed=0.25, link_mbps=1)]), 3, seed=0)
    # 8 steps x 0.5 s / 0.25 = 16 s; 125,000 B down = 1 s and 250,000 B up = 2 s at 1 Mbit/s
    assert fleet.duration(2, 8, 125_000, 250_000) == pytest.approx(19.0)
    assert Fleet(DevicesConfig(), 3, seed=0).transfer_s(0, 10**9) == 0.0  # no link given: free transfers


def test_availability_memory_and_dropout_draws_match_their_probabilities():
    cfg = DevicesConfig(profiles=[profile("phone", share=0.5, availability=0.3, dropout=0.25),
                                  profile("tiny", share=0.5, memory_mb=50)])
    fleet = Fleet(cfg, 20, seed=0, footprint_mb=100.0)
    phones = [c for c in range(20) if fleet.profile(c).name == "phone"]
    online = np.zeros(20)
    for r in range(400):
        online[fleet.eligible(r)] += 1
    assert online[[c for c in range(20) if c not in phones]].sum() == 0  # 50 MB cannot hold 100 MB
    assert online[phones].mean() / 400 == pytest.approx(0.3, abs=0.03)
    drops = [fleet.drop_point(c, r) for c in phones for r in range(400)]
    assert np.mean([d is not None for d in drops]) == pytest.approx(0.25, abs=0.03)
    assert all(0 <= d < 1 for d in drops if d is not None)


def sync_sim(profiles, value, deadline=None, cohort=3, steps=4):
    cfg = DevicesConfig(step_seconds=1.0, profiles=profiles, deadline_s=deadline)
    fleet = Fleet(cfg, 3, seed=0)
    trainer = ConstantClients(lambda c: value(fleet.profile(c).name), steps=steps)
    init = OrderedDict(w=torch.zeros(4))
    return simulation(trainer, FedAvg(), clients(3), cohort, 0, init, fleet=fleet), fleet


def test_a_sync_round_lasts_until_its_slowest_client():
    sim, _ = sync_sim([profile("fast", share=2), profile("slow", share=1, speed=0.25)], {"fast": 1.0, "slow": 4.0}.get)
    rec = sim.run_round(1)
    assert rec["round_virtual_s"] == pytest.approx(16.0) and rec["virtual_s"] == pytest.approx(16.0)  # 4 steps / 0.25
    assert torch.allclose(sim.server.global_state["w"], torch.full((4,), 2.0))  # (1 + 1 + 4) / 3
    sim.run_round(2)
    assert sim.clock == pytest.approx(32.0)


def test_updates_after_the_deadline_are_left_out_and_the_round_closes_at_it():
    sim, _ = sync_sim([profile("fast", share=2), profile("slow", share=1, speed=0.25)], {"fast": 1.0, "slow": 4.0}.get,
                      deadline=10.0)
    rec = sim.run_round(1)
    assert rec["late"] == 1 and rec["accepted"] == 2 and rec["round_virtual_s"] == pytest.approx(10.0)
    assert torch.allclose(sim.server.global_state["w"], torch.ones(4))  # the slow client's 4.0 never arrives
    assert sim.server.rejected[-1]["reason"].startswith("late")
    assert rec["bytes_up"] > 0  # it did upload: those bytes were spent


def test_clients_that_drop_mid_round_are_left_out_without_losing_the_round():
    profiles = [profile("steady", share=2), profile("flaky", share=1, dropout=0.999)]
    sim, fleet = sync_sim(profiles, {"steady": 1.0, "flaky": 100.0}.get)
    rec = sim.run_round(1)
    assert rec["dropped"] == 1 and rec["accepted"] == 2 and sim.server.version == 1
    assert torch.allclose(sim.server.global_state["w"], torch.ones(4))
    flaky = next(c for c in range(3) if fleet.profile(c).name == "flaky")
    assert sim.server.ledger.per_client[flaky]["down"] > 0 and sim.server.ledger.per_client[flaky].get("up", 0) == 0


def test_when_every_client_drops_the_global_model_stays():
    sim, _ = sync_sim([profile("flaky", dropout=0.999)], lambda name: 5.0)
    rec = sim.run_round(1)
    assert rec["accepted"] == 0 and rec["dropped"] == 3
    assert torch.equal(sim.server.global_state["w"], torch.zeros(4))


# -- HetLoRA ---------------------------------------------------------------------------
def test_truncate_pad_and_zero_beyond_touch_only_the_rank_axis():
    state = OrderedDict([("m.lora_A.weight", torch.arange(12.0).reshape(4, 3)),
                         ("m.lora_B.weight", torch.arange(8.0).reshape(2, 4)), ("head.bias", torch.ones(2))])
    small = lora_rank.truncate(state, 2)
    assert small["m.lora_A.weight"].shape == (2, 3) and small["m.lora_B.weight"].shape == (2, 2)
    assert torch.equal(small["m.lora_B.weight"], torch.tensor([[0.0, 1.0], [4.0, 5.0]]))
    padded = lora_rank.pad(small, state, 2)
    assert torch.equal(padded["m.lora_A.weight"], torch.tensor([[0.0, 1, 2], [3, 4, 5], [0, 0, 0], [0, 0, 0]]))
    assert torch.equal(padded["head.bias"], torch.ones(2))
    assert torch.equal(lora_rank.zero_beyond(state, 3)["m.lora_B.weight"][:, 3], torch.zeros(2))
    assert torch.equal(state["m.lora_B.weight"][:, 3], torch.tensor([3.0, 7.0]))  # the input is untouched
    with pytest.raises(ValueError, match="rank 3"):
        lora_rank.pad(small, state, 3)


@pytest.fixture(scope="module")
def enc():
    return random_table(40, seed=11)


def lora_model(r, alpha):
    return build_model(ModelConfig(name="tiny-bert", method="lora", max_length=16, lora=LoraConfig(r=r, alpha=alpha)),
                       3, seed=0)


def random_lora_state(fm, seed=0):
    g = torch.Generator().manual_seed(seed)
    return OrderedDict((k, torch.randn(v.shape, generator=g) * 0.1 if lora_rank.rank_axis(k) is not None else v.clone())
                       for k, v in get_state(fm.params).items())


def test_a_small_rank_client_trains_exactly_a_rank_r_adapter(enc):
    """Masking components 2..3 of a rank-4 adapter == a genuine rank-2 peft adapter with the same scaling."""
    fm4, fm2 = lora_model(4, 8.0), lora_model(2, 4.0)  # alpha / r = 2 for both
    g4 = random_lora_state(fm4)
    tc = TrainConfig(local_steps=3, batch_size=4, lr=0.01)
    client = Client(0, np.arange(12), np.arange(0))
    het = HetRankTrainer(LocalTrainer(fm4, enc, tc, seed=1), lambda c: 2, full_rank=4)
    got = het.local_update(FedAvg(), Broadcast(g4, 0), client, 1)
    ref = LocalTrainer(fm2, enc, tc, seed=1).local_update(FedAvg(), Broadcast(lora_rank.truncate(g4, 2), 0), client, 1)
    assert list(got.delta) == list(ref.delta)
    for k, v in ref.delta.items():
        assert got.delta[k].shape == v.shape
        assert torch.allclose(got.delta[k], v, atol=1e-6), k
    assert any(v.abs().max() > 1e-4 for k, v in ref.delta.items() if lora_rank.rank_axis(k) is not None)


def test_the_server_zero_pads_small_rank_updates_before_the_mean(enc):
    fm = lora_model(4, 8.0)
    g = random_lora_state(fm, seed=1)
    tc = TrainConfig(local_steps=2, batch_size=4, lr=0.01)
    cs = [Client(c, np.arange(10 * c, 10 * c + 10 - 4 * c), np.arange(0)) for c in range(2)]  # 10 and 6 examples
    fleet = Fleet(DevicesConfig(profiles=[profile("big", share=1, lora_rank=4), profile("small", share=1, lora_rank=2)]),
                  2, seed=0)
    trainer = HetRankTrainer(LocalTrainer(fm, enc, tc, seed=2), fleet.rank, 4)
    sim = simulation(trainer, FedAvg(), cs, 2, 0, g, fleet=fleet, full_rank=4)
    rec = sim.run_round(1)
    assert rec["accepted"] == 2
    small = next(c for c in range(2) if fleet.rank(c) == 2)
    ups = {c: sim.server.ledger.per_client[c]["up"] for c in range(2)}
    assert ups[small] < ups[1 - small]  # the rank-2 client uploads fewer bytes
    expect = OrderedDict((k, torch.zeros_like(v)) for k, v in g.items())
    for c in cs:
        u = trainer.local_update(FedAvg(), Broadcast(g, 0), c, 1)
        for k, d in lora_rank.pad(u.delta, g, fleet.rank(c.cid)).items():
            expect[k] += d * len(c.train_idx) / 16
    for k, v in g.items():
        assert torch.allclose(sim.server.global_state[k], v + expect[k], atol=1e-6), k
    a_key = next(k for k in g if lora_rank.rank_axis(k) == 0)
    big = cs[1 - small]
    u_big = trainer.local_update(FedAvg(), Broadcast(g, 0), big, 1)
    rows = sim.server.global_state[a_key][2:] - g[a_key][2:]  # only the rank-4 client moves components 2..3
    assert torch.allclose(rows, u_big.delta[a_key][2:] * len(big.train_idx) / 16, atol=1e-6)


# -- one-line errors ---------------------------------------------------------------------
@pytest.mark.parametrize("extra, message", [
    ({"devices.profiles": "[{name: a, share: 1, lora_rank: 2}]"}, "needs a method with a rank \\(lora\\)"),
    ({"model.method": "lora", "model.lora.r": 2, "devices.profiles": "[{name: a, share: 1, lora_rank: 4}]"},
     "exceeds the global rank"),
    ({"model.method": "lora", "compression.upload": "[int8]", "devices.profiles": "[{name: a, share: 1, lora_rank: 4}]"},
     "compression.upload"),
    ({"privacy.client_dp.enabled": "true", "privacy.client_dp.noise_multiplier": 1.0,
      "devices.profiles": "[{name: a, share: 1, availability: 0.5}]"}, "uniform sampling"),
    ({"devices.profiles": "[{name: a, share: 1}, {name: a, share: 1}]"}, "unique"),
])
def test_unsupported_device_combinations_fail_with_one_line(tmp_path, extra, message):
    with pytest.raises(FedfmError, match=message) as err:
        fedfm.run(None, tiny_cls_overrides(tmp_path, **extra))
    assert "\n" not in str(err.value)


def test_a_run_with_device_profiles_reports_virtual_time_and_profiles(tmp_path):
    profiles = "[{name: fast, share: 0.5}, {name: slow, share: 0.5, speed: 0.2, dropout: 0.2}]"
    summary = fedfm.run(None, tiny_cls_overrides(tmp_path, **{"devices.profiles": profiles, "federation.rounds": 3}))
    assert summary["devices"]["fast"]["clients"] == 3 and summary["devices"]["slow"]["clients"] == 3
    assert summary["devices"]["slow"]["mean_compute_s"] == pytest.approx(5 * summary["devices"]["fast"]["mean_compute_s"])
    assert summary["virtual_s"] > 0
