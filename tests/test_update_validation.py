"""Update validation on the server (issue 14, item 4): every check, before any fold, on by default.

Each test drives a real :class:`~fedfm.server.server.Server` the way a driver
does: updates are encoded by the real :class:`~fedfm.compression.wire.Wire`
as a client encodes them, handed to ``Server.receive`` and folded by FedAvg;
what the round released shows what was folded. The global state is
``w = [1, 1, 1, 1]`` (norm 2) and an honest delta is ``c * [0.5, 0.5, 0.5, 0.5]``
(norm ``c``), so every bound is computable by hand.
"""

import json
import logging
import math
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import save as st_save

import fedfm
from fedfm.algorithms.base import Update
from fedfm.algorithms.fedavg import FedAvg
from fedfm.compression.wire import Wire
from fedfm.config.schema import AsyncConfig, ValidationConfig
from fedfm.server.compose import training_rows
from fedfm.server.server import Server

from test_end_to_end import tiny_cls_overrides

pytestmark = pytest.mark.usefixtures("one_thread")

ONES = torch.ones(4)
WIRE = Wire()


def server(validation=None, **kw) -> Server:
    return Server(FedAvg(), OrderedDict(w=ONES.clone()), validation=validation, **kw)


def upload(cid: int, norm: float = 1.0, examples: int = 10, *, delta=None, base_version: int = 0) -> bytes:
    """What client ``cid`` sends: a delta of L2 norm ``norm`` (4 entries of ``norm / 2``), encoded by the Wire."""
    delta = OrderedDict(w=torch.full((4,), norm / 2)) if delta is None else delta
    u = Update(client_id=cid, delta=delta, num_examples=examples, metrics={"train_loss": 1.0},
               base_version=base_version)
    return WIRE.encode_update(u, {}, 0)


def released(s: Server) -> torch.Tensor:
    """The new global ``w`` minus the old one: the (weighted) mean of the folded deltas."""
    return s.global_state["w"] - ONES


def run_round(s: Server, cohort, uploads, round_idx: int = 0) -> dict:
    """Open a round on ``cohort``, hand ``[(sender, payload)]`` to the server, close it."""
    s.open_round(round_idx, cohort)
    for sender, payload in uploads:
        s.receive(payload, sender)
    return s.close_round()


# -- the norm bounds ----------------------------------------------------------------------
def test_an_update_scaled_by_1e30_is_rejected_by_the_absolute_bound():
    s = server(ValidationConfig(max_norm=10.0, warmup_factor=None))
    record = run_round(s, [0, 1, 2], [(0, upload(0, 1.0)), (1, upload(1, 9.99)), (2, upload(2, 1e30))])
    assert record["rejected"] == 1 and record["rejected_by_reason"] == {"norm": 1}
    assert s.rejected[-1]["client"] == 2 and "exceeds validation.max_norm=10" in s.rejected[-1]["reason"]
    assert torch.allclose(released(s), torch.full((4,), (0.5 + 9.99 / 2) / 2))  # equal weights: the mean of two
    assert bool(torch.isfinite(s.global_state["w"]).all())


def test_the_default_warm_up_bound_rejects_1e30_in_the_first_round():
    s = server()  # defaults: before 5 accepted norms, bound = 100 x ||global state|| = 100 x 2
    record = run_round(s, [0, 1, 2], [(0, upload(0, 199.0)), (1, upload(1, 201.0)), (2, upload(2, 1e30))])
    assert record["rejected_by_reason"] == {"norm": 2}
    assert "global state's norm (warm-up) 2" in s.rejected[-1]["reason"]
    assert torch.allclose(released(s), torch.full((4,), 199.0 / 2))


def test_the_running_median_bound_applies_after_min_norms_accepted_updates():
    s = server(ValidationConfig(max_norm_factor=10.0, min_norms=3, warmup_factor=None))
    first = run_round(s, [0, 1, 2], [(c, upload(c, c + 1.0)) for c in (0, 1, 2)])  # norms 1, 2, 3: no bound yet
    assert "rejected" not in first and s.norms.history == [1.0, 2.0, 3.0]
    # median 2 -> bound 20: 20 is accepted, 21 and 1e30 are not
    second = run_round(s, [0, 1, 2], [(0, upload(0, 20.0)), (1, upload(1, 21.0)), (2, upload(2, 1e30))], 1)
    assert second["rejected_by_reason"] == {"norm": 2}
    assert "exceeds 10 x the median accepted norm 2" in s.rejected[-1]["reason"]
    assert torch.allclose(released(s), torch.full((4,), (1 + 2 + 3) / 3 / 2 + 20.0 / 2))
    assert s.norms.history == [1.0, 2.0, 3.0, 20.0]


def test_the_median_history_is_a_window_and_round_trips_through_the_checkpoint_json():
    s = server(ValidationConfig(norm_window=4, min_norms=1))
    for r, norms in enumerate([(3.0, 1.0, 2.0), (5.0, 4.0)]):
        run_round(s, list(range(len(norms))), [(c, upload(c, n)) for c, n in enumerate(norms)], r)
    assert s.norms.history == [2.0, 3.0, 4.0, 5.0]  # each round's norms sorted, the oldest dropped
    tensors, orders = {}, {}
    meta = json.loads(json.dumps(s.state_dict(tensors, orders)))
    back = server(ValidationConfig(norm_window=4, min_norms=1))
    back.load_state_dict(meta, tensors, orders)
    assert back.norms.history == s.norms.history
    back.open_round(2, [0])
    assert back.norms.reference[:2] == (10.0, 3.5)


def test_norm_bounds_are_off_under_secure_aggregation_and_client_dp():
    """Masked updates cannot be measured, and the DP fold clips every update to its clip norm."""
    assert server(secure=object()).norms is None
    assert server(privacy=object()).norms is None
    assert server(ValidationConfig(max_norm_factor=None, warmup_factor=None)).norms is not None


# -- the example count ---------------------------------------------------------------------
class _Rows:
    def __init__(self, n):
        self.train_idx = range(n)


@pytest.mark.parametrize("examples", [10**15, 0, -3, 8])
def test_an_implausible_example_count_is_rejected(examples):
    s = server()
    s.example_cap = training_rows([_Rows(7), _Rows(7)])  # what build_server sets from the partition
    record = run_round(s, [0, 1], [(0, upload(0, 1.0, 7)), (1, upload(1, 3.0, examples))])
    assert record["rejected_by_reason"] == {"examples": 1} and s.rejected[-1]["client"] == 1
    assert torch.allclose(released(s), torch.full((4,), 0.5))  # only client 0 (exactly at its cap) was folded


def test_the_builder_caps_example_counts_at_each_clients_partition(tmp_path):
    from fedfm.build import build_run
    from fedfm.config import resolve_config

    r = build_run(resolve_config(None, tiny_cls_overrides(tmp_path, **{"federation.rounds": 1})))
    assert [r.server.example_cap(c.cid) for c in r.clients] == [len(c.train_idx) for c in r.clients]
    assert r.server.example_cap(len(r.clients)) is None


# -- who sends --------------------------------------------------------------------------------
def test_an_unknown_client_a_duplicate_and_an_impostor_are_rejected_and_counted():
    s = server()
    record = run_round(s, [0, 1], [
        (0, upload(0, 1.0)),
        (0, upload(0, 3.0)),  # the same client again in this round
        (5, upload(5, 1.0)),  # not in the cohort
        (1, upload(0, 1.0)),  # sent by client 1, claims to be client 0
    ])
    assert record["rejected"] == 3
    assert record["rejected_by_reason"] == {"duplicate": 1, "identity": 1, "unknown_client": 1}
    assert torch.allclose(released(s), torch.full((4,), 0.5))  # the first update of client 0 only
    record = run_round(s, [0, 1], [(0, upload(0, 1.0))], 1)  # a new round: client 0 may report again
    assert "rejected" not in record and record["version"] == 2


def test_asynchronous_only_a_client_holding_a_dispatched_version_may_report_once():
    s = server(asynchronous=AsyncConfig(enabled=True, buffer_size=2))
    s.open_round(0)
    s.broadcast(3)
    assert s.receive(upload(3, 1.0), 3)
    assert not s.receive(upload(3, 1.0), 3)  # its one download is spent
    assert not s.receive(upload(4, 1.0), 4)  # never sent anything
    record = s.close_round()
    assert record["rejected_by_reason"] == {"unknown_client": 2}
    assert torch.allclose(released(s), torch.full((4,), 0.5))


# -- malformed payloads, through the same path -------------------------------------------
def _forged_metadata(num_examples="many") -> bytes:
    meta = {"kind": "update", "client_id": 0, "num_examples": num_examples, "order": ["delta/w"]}
    return st_save({"delta/w": torch.ones(4)}, metadata={"fedfm": json.dumps(meta)})


PICKLE = b"\x80\x04\x95\x0b\x00\x00\x00\x00\x00\x00\x00\x8c\x07builtin\x94."  # a pickle stream, never unpickled

CRAFTED = {
    "truncated": (lambda: upload(0)[:40], "malformed"),
    "pickle": (lambda: PICKLE, "malformed"),
    "empty": (lambda: b"", "malformed"),
    "bad metadata": (_forged_metadata, "malformed"),
    "fractional example count": (lambda: _forged_metadata(2.5), "malformed"),  # refused, never rounded to 2
    "boolean example count": (lambda: _forged_metadata(True), "malformed"),
    "string example count": (lambda: _forged_metadata("7"), "malformed"),
    "NaN": (lambda: upload(0, delta=OrderedDict(w=torch.tensor([1.0, math.nan, 0.0, 0.0]))), "invalid"),
    "Inf": (lambda: upload(0, delta=OrderedDict(w=torch.tensor([1.0, math.inf, 0.0, 0.0]))), "invalid"),
    "wrong shape": (lambda: upload(0, delta=OrderedDict(w=torch.ones(5))), "invalid"),
    "wrong dtype": (lambda: upload(0, delta=OrderedDict(w=torch.ones(4, dtype=torch.float64))), "invalid"),
    "wrong names": (lambda: upload(0, delta=OrderedDict(v=torch.ones(4))), "invalid"),
}


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_a_crafted_payload_is_rejected_logged_and_counted_and_the_round_goes_on(name, caplog):
    make, kind = CRAFTED[name]
    s = server()
    with caplog.at_level(logging.WARNING, logger="fedfm"):
        record = run_round(s, [0, 1], [(0, make()), (1, upload(1, 1.0))])
    assert record["rejected_by_reason"] == {kind: 1} and s.rejected[-1]["client"] == 0
    assert "rejected update from client 0" in caplog.text
    assert torch.allclose(released(s), torch.full((4,), 0.5)) and record["version"] == 1


# -- a regular run ---------------------------------------------------------------------------
def test_a_regular_run_rejects_nothing_with_the_default_bounds(tmp_path):
    """Three rounds of three: the warm-up bound in rounds 1-2, the median bound (6 norms) in round 3."""
    over = tiny_cls_overrides(tmp_path, **{"federation.rounds": 3, "train.local_steps": 4, "eval.every": 0,
                                           "workers": 1, "threads": 1})
    summary = fedfm.run(None, over)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["rejected_updates"] == 0
    assert [r["accepted"] for r in records if "accepted" in r] == [3, 3, 3]
    assert not any("rejected" in r for r in records)


def test_a_runs_rejections_are_counted_in_metrics_jsonl(tmp_path):
    """Gaussian attackers with sigma 1e6 are far past the warm-up bound: each is left out and counted."""
    over = tiny_cls_overrides(tmp_path, **{"federation.rounds": 2, "train.local_steps": 2, "eval.every": 0,
                                           "workers": 1, "threads": 1, "attack.name": "gaussian",
                                           "attack.sigma": 1e6, "attack.fraction": 0.5})
    summary = fedfm.run(None, over)
    rounds = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rounds if "accepted" in r]
    assert sum(r["malicious"] for r in rounds) > 0
    for r in rounds:
        assert r.get("rejected", 0) == r["malicious"] and r["accepted"] == 3 - r["malicious"]
        assert r.get("rejected_by_reason", {}) == ({"norm": r["malicious"]} if r["malicious"] else {})
    assert summary["rejected_updates"] == sum(r["malicious"] for r in rounds)
