"""Secure aggregation wired into runs: the fold sees only sums, results match plain aggregation."""

from __future__ import annotations

import json
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import load_file

import fedfm
from fedfm.algorithms.base import Update
from fedfm.algorithms.fedavg import MeanDeltaFold
from fedfm.errors import FedfmError
from fedfm.privacy.client_dp import ClientDPFold
from fedfm.privacy.secagg_crypto import SecAggAbort
from fedfm.privacy.secagg_wire import MessageFormatError, pack, unpack
from fedfm.compression.ledger import ByteLedger
from fedfm.server.secure import SecureRound

TINY = [
    "model.name=tiny-bert",
    "model.max_length=32",
    "data.max_examples=400",
    "federation.num_clients=8",
    "federation.clients_per_round=4",
    "federation.rounds=2",
    "train.local_steps=2",
    "eval.every=0",
    "eval.clients=false",
    "progress=false",
]


def _global():
    g = torch.Generator().manual_seed(0)
    return OrderedDict(w=torch.randn(3, 4, generator=g), b=torch.randn(5, generator=g), step=torch.tensor([7]))


def _updates(n, scale=0.05):
    g = torch.Generator().manual_seed(1)
    gs = _global()
    return [
        Update(
            client_id=c,
            delta=OrderedDict((k, torch.randn(v.shape, generator=g) * scale if v.is_floating_point() else v) for k, v in gs.items()),
            num_examples=10 + 7 * c,
        )
        for c in range(n)
    ]


def _secure(fold, cohort, ledger=None, **kw):
    args = dict(threshold=None, neighbours=None, bits=None, clip_range=1.0, max_weight=1000.0, round_seed=b"seed0001")
    args.update(kw)
    return SecureRound(cohort, fold, _global(), ledger or ByteLedger(), **args)


@pytest.mark.parametrize("dropped", [[], [3], [1, 4]])
def test_secure_sum_matches_plain_weighted_mean_of_survivors(dropped):
    ups = _updates(6)
    plain, secure = MeanDeltaFold(), MeanDeltaFold()
    plain.start(_global())
    secure.start(_global())
    sr = _secure(secure, list(range(6)))
    for u in ups:
        if u.client_id not in dropped:
            plain.add(u)
            sr.submit(u)
    stats = sr.finish()
    assert stats["secagg_survivors"] == 6 - len(dropped) and stats["secagg_dropped"] == len(dropped)
    a, b = plain.finish(), secure.finish()
    step = 2.0 / (2 ** stats["secagg_bits"] - 1)
    for k in a:
        assert a[k].dtype == b[k].dtype
        assert torch.allclose(a[k].double(), b[k].double(), atol=6 * step * 1000 / 10, rtol=0)
    assert torch.equal(b["step"], _global()["step"])  # non-float entries keep their global value


def test_summand_coordinates_outside_the_range_are_counted_and_logged(caplog):
    # summand r * delta with r = n / max_weight: 0.05 * (10 + 7c) / 10 stays inside R = 1 ...
    fold = MeanDeltaFold()
    fold.start(_global())
    sr = _secure(fold, list(range(4)), max_weight=10.0)
    for u in _updates(4):
        sr.submit(u)
    assert sr.finish()["secagg_clipped"] == 0
    # ... but not inside R = 0.01: every coordinate beyond it is counted (on the clients) and logged
    ups = _updates(4)
    fold.start(_global())
    sr = _secure(fold, list(range(4)), max_weight=10.0, clip_range=0.01)
    want = 0
    for u in ups:
        r = min(u.num_examples / 10.0, 1.0)
        want += sum(int((r * u.delta[k].abs() > 0.01).sum()) for k in ("w", "b"))
        sr.submit(u)
    with caplog.at_level("WARNING", logger="fedfm"):
        assert sr.finish()["secagg_clipped"] == want > 0
    assert f"{want} summand coordinates were outside the range R and clipped" in caplog.text


def test_secure_round_aborts_below_threshold():
    fold = MeanDeltaFold()
    fold.start(_global())
    sr = _secure(fold, list(range(6)))  # threshold 4 of 6
    for u in _updates(6)[:3]:
        sr.submit(u)
    with pytest.raises(SecAggAbort):
        sr.finish()


def test_secagg_plus_neighbourhoods_give_the_same_sum():
    ups = _updates(9)
    full, sparse = MeanDeltaFold(), MeanDeltaFold()
    for fold in (full, sparse):
        fold.start(_global())
    led_full, led_sparse = ByteLedger(), ByteLedger()
    a, b = _secure(full, list(range(9)), led_full), _secure(sparse, list(range(9)), led_sparse, neighbours=4)
    for u in ups:
        a.submit(u)
        b.submit(u)
    a.finish(), b.finish()
    x, y = full.finish(), sparse.finish()
    for k in x:
        assert torch.allclose(x[k], y[k], atol=1e-6)
    assert led_sparse.total["up"] < led_full.total["up"]  # fewer shares per client


def test_dp_summand_is_clipped_on_the_client_and_noise_added_to_the_sum():
    ups = _updates(5, scale=1.0)  # norms ~4 > C=1: clipped
    kw = dict(clip_norm=1.0, noise_multiplier=0.7, expected_clients=5.0, seed=3, adaptive=True,
              clipped_count_stddev=1.0, reproducible=True)
    plain, secure = ClientDPFold(**kw), ClientDPFold(**kw)
    plain.start(_global())
    secure.start(_global())
    sr = _secure(secure, list(range(5)))
    vec, _ = sr.layout.vector(ups[0])
    assert abs(vec[:-2]).max() <= 1.0 + 1e-12  # divided by C: lossless fixed-point range
    assert vec[-2:].tolist() == [1.0, 0.0]  # weight 1, norm above C
    for u in ups:
        plain.add(u)
        sr.submit(u)
    sr.finish()
    a, b = plain.finish(), secure.finish()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6)  # same noise stream, same clipped sum
    assert secure.clip_norm == pytest.approx(plain.clip_norm)  # adaptive clipping from the secure bit sum


def test_messages_are_safetensors_and_round_trip():
    msg = {"type": "keys", "id": 3, "keys": {1: {"c_pk": b"\x00\x01", "s_pk": b""}}, "survivors": [1, 2], "clip": 1.5}
    raw = pack(msg)
    assert int.from_bytes(raw[:8], "little") < len(raw)  # a safetensors header
    assert unpack(raw) == msg
    for bad in (b"", b"not safetensors", raw[:-1]):
        with pytest.raises(MessageFormatError):
            unpack(bad)


def _state(out):
    return load_file(f"{out}/final_state.safetensors")


def test_secagg_run_equals_plain_run_and_the_fold_never_sees_an_update(tmp_path, monkeypatch):
    fedfm.run(None, TINY + [f"out={tmp_path}/plain"])

    def no_individual_updates(self, update):
        raise AssertionError("the server fold received an individual update")

    monkeypatch.setattr(MeanDeltaFold, "add", no_individual_updates)
    fedfm.run(None, TINY + [f"out={tmp_path}/sec", "privacy.secure_aggregation.enabled=true"])
    a, b = _state(tmp_path / "plain"), _state(tmp_path / "sec")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    recs = [json.loads(x) for x in open(tmp_path / "sec" / "metrics.jsonl")]
    plain = [json.loads(x) for x in open(tmp_path / "plain" / "metrics.jsonl")]
    assert all(r["secagg_survivors"] == 4 for r in recs[1:])
    # masked vectors (4 bytes per value + 1 weight) plus keys and shares: more than the plain upload
    assert recs[-1]["bytes_up_total"] > plain[-1]["bytes_up_total"]


def test_secagg_with_dropout_and_an_aborted_round(tmp_path):
    summary = fedfm.run(
        None,
        TINY
        + [
            f"out={tmp_path}/drop",
            "federation.clients_per_round=6",
            "federation.rounds=4",
            "privacy.secure_aggregation.enabled=true",
            "privacy.secure_aggregation.threshold=5",
            "privacy.secure_aggregation.dropout=0.25",
            "seed=2",
        ],
    )
    recs = [json.loads(x) for x in open(tmp_path / "drop" / "metrics.jsonl")][1:]
    finished = [r for r in recs if "aborted" not in r]
    aborted = [r for r in recs if "aborted" in r]
    assert finished and aborted, [(r.get("secagg_dropped"), r.get("aborted")) for r in recs]
    assert any(r["secagg_dropped"] > 0 for r in finished)  # recovered from the shares
    assert all(r["version"] == recs[i - 1]["version"] for i, r in enumerate(recs) if "aborted" in r and i > 0)
    assert summary["rounds"] == 4


def test_secagg_with_client_dp_matches_dp_without_it(tmp_path):
    dp = ["privacy.client_dp.enabled=true", "privacy.client_dp.noise_multiplier=0.5", "privacy.client_dp.clip_norm=0.1",
          "privacy.reproducible_noise=true"]
    fedfm.run(None, TINY + dp + [f"out={tmp_path}/dp"])
    fedfm.run(None, TINY + dp + [f"out={tmp_path}/dpsec", "privacy.secure_aggregation.enabled=true"])
    a, b = _state(tmp_path / "dp"), _state(tmp_path / "dpsec")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    summary = json.loads(open(tmp_path / "dpsec" / "summary.json").read())
    assert summary["privacy"]["epsilon"] > 0


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["robust.rule=median"], "sum"),
        (["algorithm.name=scaffold"], "scaffold"),
        (["federation.clients_per_round=2"], "at least 3"),
        (["privacy.secure_aggregation.threshold=2"], "threshold"),
        (["privacy.secure_aggregation.bits=32"], "overflows"),
    ],
)
def test_secagg_config_errors(tmp_path, extra, needle):
    with pytest.raises(FedfmError, match=needle):
        fedfm.run(None, TINY + [f"out={tmp_path}/x", "privacy.secure_aggregation.enabled=true", *extra])
