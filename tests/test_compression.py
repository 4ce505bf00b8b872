"""Codecs on the wire (fedfm.compression): exactness, unbiasedness, top-k + error feedback, byte ledger."""

import json
import logging
import math
from collections import OrderedDict

import pytest
import torch

import fedfm
from fedfm.algorithms.base import Broadcast, Update
from fedfm.compression import RESIDUAL_KEY, CodecError, Wire, wire
from fedfm.compression.chain import CodecChain, build_codec
from fedfm.compression.codecs import StochasticQuant
from fedfm.config import load_config
from fedfm.errors import FedfmError

pytestmark = pytest.mark.usefixtures("one_thread")


def chain(*names, fraction=0.1, chunk=None):
    return CodecChain([build_codec(n, fraction, chunk) for n in names])


def roundtrip(ch, x, seed=0):
    parts, metas = ch.encode(x, torch.Generator().manual_seed(seed))
    return ch.decode(parts, metas, list(x.shape)), parts


def compressor(**kw):
    return Wire(load_config(None, [f"compression.{k}={v}" for k, v in kw.items()]).compression, seed=7)


@pytest.mark.parametrize("name,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_casts_round_trip_exactly_to_their_dtype(name, dtype):
    x = torch.randn(3, 41, generator=torch.Generator().manual_seed(1)) * 3
    y, parts = roundtrip(chain(name), x)
    assert torch.equal(y, x.to(dtype).float())  # round-to-nearest in the dtype, nothing more
    assert parts["0.v"].dtype == dtype and parts["0.v"].numel() == x.numel()


@pytest.mark.parametrize("bits,chunk", [(8, None), (8, 16), (4, None), (4, 16)])
def test_stochastic_quantization_is_unbiased_and_within_one_step(bits, chunk):
    x = torch.randn(100, generator=torch.Generator().manual_seed(2))
    L = 2 ** (bits - 1) - 1
    c = chunk or x.numel()
    # the scale per value, computed independently: max |x| over its chunk / L
    s = torch.cat([x[i : i + c].abs().max().expand(min(c, x.numel() - i)) / L for i in range(0, x.numel(), c)])
    ch = chain(f"int{bits}", chunk=chunk)
    n = 4000
    decodes = torch.stack([roundtrip(ch, x, seed=i)[0] for i in range(n)])
    # error bound: floor(x/s + u) is within one step of x/s
    assert bool(((decodes - x).abs() <= s * (1 + 1e-6)).all())
    # unbiased: each decode is x + s*(B - p) with B ~ Bernoulli(p), variance <= s^2/4, so the mean
    # of n decodes has standard deviation <= s / (2 sqrt n); 6 of them bound all 100 coordinates
    # (two-sided normal tail 2e-9 each).
    assert bool(((decodes.mean(0) - x).abs() <= 6 * s / (2 * math.sqrt(n)) + 1e-7).all())
    # ... while rounding to nearest would be off by far more than that tolerance somewhere
    nearest = torch.round(x / s) * s
    assert float((nearest - x).abs().max()) > float((6 * s / (2 * math.sqrt(n))).max())
    assert decodes.std(0).max() > 0  # really stochastic


def test_int4_packs_two_codes_per_byte():
    # s = max|x| / 7 = 0.5 and x/s are integers, so the codes are exact whatever u is
    x = torch.tensor([3.5, -3.5, 0.0, 1.5, -0.5])
    q = StochasticQuant(4)
    parts, meta = q.encode(x, torch.Generator().manual_seed(0))
    # codes 7, -7, 0, 3, -1 -> nibbles q+8 = 15, 1, 8, 11, 7 (+ pad 8), low nibble first
    assert parts["q"].dtype == torch.uint8
    assert parts["q"].tolist() == [15 | 1 << 4, 8 | 11 << 4, 7 | 8 << 4]
    assert parts["s"].tolist() == [0.5]
    assert torch.equal(q.decode(parts, meta), x)
    y, parts8 = roundtrip(chain("int8"), torch.randn(1000))
    y4, parts4 = roundtrip(chain("int4"), torch.randn(1000))
    assert parts8["0.q"].numel() == 1000 and parts4["0.q"].numel() == 500  # 1 byte vs half a byte per value


def test_topk_keeps_exactly_the_k_largest_magnitudes():
    x = torch.tensor([0.3, -2.0, 0.1, 1.5, -0.7, 0.05, 0.9, -1.1, 0.2, 0.0])
    y, parts = roundtrip(chain("topk", fraction=0.3), x)  # k = ceil(0.3 * 10) = 3
    largest = sorted(range(10), key=lambda i: -abs(float(x[i])))[:3]  # 1, 3, 7
    assert sorted(parts["0.i"].tolist()) == sorted(largest) == [1, 3, 7]
    expected = torch.zeros(10)
    expected[largest] = x[largest]
    assert torch.equal(y, expected)


def update(cid, values):
    return Update(client_id=cid, delta=OrderedDict(w=torch.tensor(values)), num_examples=10,
                  metrics={"train_loss": 1.0}, base_version=0)


def test_error_feedback_two_rounds_by_hand():
    comp = compressor(upload="[topk]", topk_fraction=0.5, error_feedback="true")
    state: dict = {}
    # round 1: keep the 2 largest of [1, -3, 0.5, 2] -> send [0, -3, 0, 2], keep e = [1, 0, 0.5, 0]
    payload = comp.encode_update(update(4, [1.0, -3.0, 0.5, 2.0]), state, round_idx=1)
    assert comp.decode_update(payload).delta["w"].tolist() == [0.0, -3.0, 0.0, 2.0]
    assert state[RESIDUAL_KEY]["w"].tolist() == [1.0, 0.0, 0.5, 0.0]
    # round 2: code x = [0.5, 1, -0.25, 0] + e = [1.5, 1, 0.25, 0] -> send [1.5, 1, 0, 0], e = [0, 0, 0.25, 0]
    payload = comp.encode_update(update(4, [0.5, 1.0, -0.25, 0.0]), state, round_idx=2)
    assert comp.decode_update(payload).delta["w"].tolist() == [1.5, 1.0, 0.0, 0.0]
    assert state[RESIDUAL_KEY]["w"].tolist() == [0.0, 0.0, 0.25, 0.0]
    # without error feedback the residual is dropped: round 2 sends the plain top-2 of delta
    plain, plain_state = compressor(upload="[topk]", topk_fraction=0.5), {}
    payload = plain.encode_update(update(4, [0.5, 1.0, -0.25, 0.0]), plain_state, round_idx=2)
    assert plain.decode_update(payload).delta["w"].tolist() == [0.5, 1.0, 0.0, 0.0] and not plain_state


def test_error_feedback_residual_is_x_minus_decoded_through_a_lossy_chain():
    comp, state = compressor(upload="[topk,int8]", topk_fraction=0.25, error_feedback="true"), {}
    d1 = torch.randn(64, generator=torch.Generator().manual_seed(3))
    p1 = comp.encode_update(update(1, d1.tolist()), state, 1)
    sent1 = comp.decode_update(p1).delta["w"]
    assert torch.allclose(state[RESIDUAL_KEY]["w"], d1 - sent1, atol=0)
    assert int((sent1 != 0).sum()) <= 16
    e1 = state[RESIDUAL_KEY]["w"].clone()
    d2 = torch.randn(64, generator=torch.Generator().manual_seed(4))
    p2 = comp.encode_update(update(1, d2.tolist()), state, 2)
    sent2 = comp.decode_update(p2).delta["w"]
    assert torch.allclose(state[RESIDUAL_KEY]["w"], d2 + e1 - sent2, atol=1e-6)
    # nothing is lost, only delayed: what was sent plus what is kept is what was computed
    assert torch.allclose(sent1 + sent2 + state[RESIDUAL_KEY]["w"], d1 + d2, atol=1e-5)


def test_stochastic_rounding_is_reproducible_from_seed_round_client():
    comp = compressor(upload="[int8]")
    u = update(3, torch.randn(200, generator=torch.Generator().manual_seed(5)).tolist())
    a, raw = comp.encode_update(u, {}, 2), Wire.raw_size(u)
    assert a == comp.encode_update(u, {}, 2)  # same (seed, round, client): the same bytes
    assert a != comp.encode_update(u, {}, 3)  # another round: other random draws
    assert raw == len(wire.encode_update(u)) and len(a) < raw


def test_coded_broadcast_round_trip_and_download_codecs_are_deterministic():
    comp = compressor(download="[bf16]")
    b = Broadcast(state=OrderedDict(a=torch.randn(5, 3), n=torch.arange(4)), version=3,
                  extras={"c": OrderedDict(a=torch.ones(2))})
    payload, raw = comp.encode_broadcast(b), Wire.raw_size(b)
    back = comp.decode_broadcast(payload)
    assert back.version == 3 and raw == len(wire.encode_broadcast(b))
    assert torch.equal(back.state["a"], b.state["a"].bfloat16().float()) and back.state["a"].dtype == torch.float32
    assert torch.equal(back.state["n"], b.state["n"])  # integer tensors are not coded
    assert torch.equal(back.extras["c"]["a"], torch.ones(2))


def test_malformed_coded_payloads_raise_codec_errors():
    comp = compressor(upload="[topk,int4]", topk_fraction=0.5)
    good = comp.encode_update(update(1, [1.0, -2.0, 3.0, 0.5]), {}, 1)
    with pytest.raises(CodecError, match="malformed payload"):
        comp.decode_update(good[:-7])
    with pytest.raises(CodecError, match="codec chain"):
        compressor(upload="[int8]").decode_update(good)
    # the server's template bounds what a payload may ask it to allocate
    assert comp.decode_update(good, template={"w": torch.zeros(4)}).delta["w"].shape == (4,)
    with pytest.raises(CodecError, match="does not match"):
        comp.decode_update(good, template={"w": torch.zeros(5)})
    flat = wire.st_load(good)
    header = json.loads(good[8 : 8 + int.from_bytes(good[:8], "little")])
    meta = header["__metadata__"]
    bad = dict(flat)
    bad["c0/0.i"] = torch.tensor([0, 9], dtype=torch.int32)  # index past the tensor's 4 entries
    with pytest.raises(CodecError, match="out of range"):
        comp.decode_update(wire.st_save(bad, metadata=meta))
    bad = dict(flat)
    bad["c0/1.s"] = torch.tensor([float("nan")])
    with pytest.raises(CodecError, match="finite"):
        comp.decode_update(wire.st_save(bad, metadata=meta))
    bad = dict(flat)
    del bad["c0/1.q"]
    with pytest.raises(CodecError, match="missing part"):
        comp.decode_update(wire.st_save(bad, metadata=meta))


def test_config_refuses_what_cannot_work():
    with pytest.raises(Exception, match="topk must come first"):
        load_config(None, ["compression.upload=[int8,topk]"])
    with pytest.raises(Exception, match="at most one of"):
        load_config(None, ["compression.upload=[fp16,int8]"])
    with pytest.raises(Exception, match="download"):
        load_config(None, ["compression.download=[int8]"])
    with pytest.raises(Exception, match="needs an upload"):
        load_config(None, ["compression.error_feedback=true"])
    with pytest.raises(FedfmError, match="secure aggregation"):
        fedfm.run(None, ["compression.upload=[int8]", "privacy.secure_aggregation.enabled=true"])
    assert not Wire(load_config(None, []).compression).coded  # off: the plain wire, byte for byte


def test_tiny_run_with_int8_counts_bytes_exactly_and_rejects_a_malformed_payload(tmp_path, monkeypatch, caplog):
    from test_end_to_end import write_topic_csv

    sent = {"up": [], "raw_up": [], "down": [], "truncated": None}
    real_up, real_down = Wire.encode_update, Wire.encode_broadcast

    def spy_up(self, u, client_state, round_idx):
        payload = real_up(self, u, client_state, round_idx)
        raw = len(wire.encode_update(u))  # the uncoded payload, encoded independently
        if round_idx == 2 and sent["truncated"] is None:
            payload = payload[: len(payload) // 2]  # a truncated upload: rejected, not a crash
            sent["truncated"] = len(sent["up"])
            raw = len(payload)  # the server cannot know what it would have been uncoded
        sent["up"].append(len(payload))
        sent["raw_up"].append(raw)
        return payload

    def spy_down(self, b):
        payload = real_down(self, b)
        sent["down"].append((len(payload), len(wire.encode_broadcast(b))))
        return payload

    monkeypatch.setattr(Wire, "encode_update", spy_up)
    monkeypatch.setattr(Wire, "encode_broadcast", spy_down)
    data = write_topic_csv(tmp_path / "topics.csv", n=120)
    out = tmp_path / "run"
    per_round = 3
    with caplog.at_level(logging.WARNING, logger="fedfm"):
        summary = fedfm.run(None, [
            "model.name=tiny-bert", "model.method=full", "model.max_length=16", f"data.dataset={data}",
            "federation.num_clients=4",
            f"federation.clients_per_round={per_round}", "federation.rounds=2", "train.local_steps=2",
            "eval.every=0", "eval.clients=false", "progress=false", "threads=1", f"out={out}",
            "workers=1",  # the malformed payload is monkeypatched into this process only
            "compression.upload=[int8]", "compression.download=[fp16]", "compression.chunk_size=32",
        ])
    c = summary["compression"]
    assert summary["rejected_updates"] == 1
    assert any("rejected update" in r.getMessage() and "malformed" in r.getMessage() for r in caplog.records)
    # the ledger: every coded payload counted exactly, and every payload's uncoded length
    assert c["uploads"] == len(sent["up"]) == 2 * per_round
    assert c["bytes_up_total"] == summary["bytes_up_total"] == sum(sent["up"])
    assert c["bytes_up_raw_total"] == sum(sent["raw_up"])
    assert c["bytes_down_total"] == sum(per_round * n for n, _ in sent["down"])
    assert c["bytes_down_raw_total"] == sum(per_round * r for _, r in sent["down"])
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["bytes_up_raw_total"] == sum(r["bytes_up_raw"] for r in records) == c["bytes_up_raw_total"]
    # the factors, from their definitions
    full = 4 * summary["total_params"] * c["uploads"]
    assert c["factor_vs_full_model"] == pytest.approx(full / sum(sent["up"]))
    assert c["factor_vs_trainable_state"] == pytest.approx(
        summary["trainable_state_bytes"] * c["uploads"] / sum(sent["up"]))
    assert c["factor_vs_raw_payload"] == pytest.approx(sum(sent["raw_up"]) / sum(sent["up"]))
    # int8 + a float32 scale per 32 values: 1.125 of 4 bytes per value, so each intact payload is
    # between 3x and 4x smaller than its raw float32 form (headers included)
    intact = [(r, n) for i, (r, n) in enumerate(zip(sent["raw_up"], sent["up"])) if i != sent["truncated"]]
    assert len(intact) == 2 * per_round - 1 and all(3.0 < r / n < 4.0 for r, n in intact)
    assert c["full_model_bytes_per_upload"] == 4 * summary["total_params"] == summary["trainable_state_bytes"]
