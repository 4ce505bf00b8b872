from collections import OrderedDict

import numpy as np
import pytest
import torch

from fedfm.algorithms.base import Broadcast, Update
from fedfm.eval.fairness import fairness_stats
from fedfm.robustness.validate import update_problem
from fedfm.compression.ledger import ByteLedger
from fedfm.compression.wire import WireError, decode_broadcast, decode_update, encode_broadcast, encode_update


def _state():
    return OrderedDict(a=torch.tensor([[1.0, -2.0]]), b=torch.arange(3, dtype=torch.bfloat16))


def test_update_round_trips_exactly_through_the_wire():
    u = Update(7, _state(), 42, {"train_loss": 0.5}, {"control_delta": OrderedDict(a=torch.ones(1, 2))}, 3)
    payload = encode_update(u)
    assert isinstance(payload, bytes) and b"pickle" not in payload
    v = decode_update(payload)
    assert (v.client_id, v.num_examples, v.base_version, v.metrics) == (7, 42, 3, {"train_loss": 0.5})
    assert list(v.delta) == ["a", "b"]
    for k in u.delta:
        assert v.delta[k].dtype == u.delta[k].dtype and torch.equal(v.delta[k], u.delta[k])
    assert torch.equal(v.extras["control_delta"]["a"], torch.ones(1, 2))


def test_broadcast_round_trip_and_size_is_the_payload_length():
    b = Broadcast(_state(), version=5)
    payload = encode_broadcast(b)
    c = decode_broadcast(payload)
    assert c.version == 5 and torch.equal(c.state["a"], b.state["a"])
    # 2 float32 + 3 bfloat16 = 14 bytes of tensor data; the rest is the safetensors header
    assert len(payload) > 14 and len(payload) < 14 + 400


@pytest.mark.parametrize("payload", [b"", b"garbage-bytes", b"\xff" * 64])
def test_malformed_payloads_raise_wire_errors(payload):
    with pytest.raises(WireError):
        decode_update(payload)


def test_a_broadcast_is_not_accepted_as_an_update():
    with pytest.raises(WireError, match="not an update"):
        decode_update(encode_broadcast(Broadcast(_state())))


def test_update_validation_reasons():
    template = OrderedDict(w=torch.zeros(2, 2))
    ok = Update(0, OrderedDict(w=torch.ones(2, 2)), 3)
    assert update_problem(ok, template) is None
    assert "NaN or Inf" in update_problem(Update(0, OrderedDict(w=torch.tensor([[1.0, float("nan")], [0, 0]])), 3), template)
    assert "shape" in update_problem(Update(0, OrderedDict(w=torch.ones(3)), 3), template)
    assert "dtype" in update_problem(Update(0, OrderedDict(w=torch.ones(2, 2, dtype=torch.float64)), 3), template)
    assert "names" in update_problem(Update(0, OrderedDict(v=torch.ones(2, 2)), 3), template)
    assert "negative" in update_problem(Update(0, OrderedDict(w=torch.ones(2, 2)), -1), template)


def test_fairness_stats_hand_computed():
    v = np.array([0.9, 0.5, 0.7, 1.0, 0.8, 0.6, 0.95, 0.85, 0.75, 0.65, 0.55])
    s = fairness_stats(v)
    assert s["mean"] == pytest.approx(v.mean())
    # 11 clients -> ceil(1.1) = 2 worst: 0.5 and 0.55
    assert s["worst10"] == pytest.approx(0.525)
    assert s["min"] == 0.5 and s["max"] == 1.0
    # lower is better (perplexity): the 2 largest
    assert fairness_stats(np.array([10.0, 20.0, 30.0]), higher_is_better=False)["worst10"] == 30.0


def test_ledger_counts_per_round_and_cumulative():
    led = ByteLedger()
    led.start_round()
    led.record(1, "down", 100)
    led.record(1, "up", 10)
    led.record(2, "down", 100)
    led.start_round()
    led.record(2, "up", 7)
    snap = led.snapshot()
    assert snap == {"bytes_down": 0, "bytes_up": 7, "bytes_down_total": 200, "bytes_up_total": 17}
    assert led.per_client[2] == {"down": 100, "up": 7}
