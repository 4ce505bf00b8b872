"""The released model as an exponential moving average of the global versions (algorithm.ema_decay)."""

from collections import OrderedDict

import pytest
import torch
from safetensors.torch import load_file

from fedfm.algorithms.fedavg import FedAvg
from fedfm.server import checkpoint
from fedfm.server.ema import Ema
from fedfm.drivers.simulation import simulation

from test_devices import ConstantClients, clients
from test_resume import kill_resume_compare


def test_the_ema_follows_the_versions_with_its_warm_up():
    sim = simulation(ConstantClients(lambda c: 1.0), FedAvg(), clients(2), 2, 0, OrderedDict(w=torch.zeros(2)))
    server = sim.server
    server.ema = Ema(0.9)
    assert server.released_state is server.global_state  # nothing averaged yet
    seen = []
    for r in range(1, 4):
        sim.run_round(r)  # the global model moves by +1 a round; the server folds each version in once
        server.ema.update(server.global_state, server.version)  # a second call for the same version changes nothing
        seen.append(float(server.released_state["w"][0]))
    d2, d3 = min(0.9, 3 / 12), min(0.9, 4 / 13)
    ema2 = d2 * 1 + (1 - d2) * 2
    assert seen == pytest.approx([1.0, ema2, d3 * ema2 + (1 - d3) * 3])
    assert float(sim.server.global_state["w"][0]) == 3.0  # clients keep training from the newest version


def test_a_killed_run_with_ema_resumes_bit_identical_and_releases_the_average(tmp_path):
    kill_resume_compare(tmp_path, 4, 1, "v000003", **{"algorithm.ema_decay": 0.5})
    meta, tensors = checkpoint.load(checkpoint.latest(tmp_path / "killed"))
    final = load_file(str(tmp_path / "killed" / "final_state.safetensors"))
    assert all(torch.equal(final[k], tensors[f"ema/{k}"]) for k in final)
    assert any(not torch.equal(final[k], tensors[f"global/{k}"]) for k in final)  # the average, not the last
