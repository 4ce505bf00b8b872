"""model.quantize (a frozen base held as int8 or NF4, issue 17) and the measured client memory.

References: the quantized weights against torchao's own dequantization and hand-set error
bounds; a LoRA step through a quantized base against the same step through the float32 base it
was quantized from (the adapter's gradient moves by the weights' quantization error only); the
base's bytes counted by hand from the tensor shapes; the memory probe against an allocation of
known size.
"""

import json
import math

import pytest
import torch

import fedfm
from fedfm.client.peak_memory import PeakMemory
from fedfm.config import load_config
from fedfm.errors import FedfmError
from fedfm.models.build import build_model
from fedfm.models.quantize import dequantized, model_bytes, nf4_blocks, quantize_base_, storage_bytes
from golden import write_topic_csv

pytestmark = pytest.mark.usefixtures("one_thread")
torchao = pytest.importorskip("torchao")


def model_cfg(quantize, **extra):
    over = {"model.name": "tiny-bert", "model.method": "lora", "model.quantize": quantize, "model.max_length": 16}
    over.update(extra)
    return load_config(None, [f"{k}={v}" for k, v in over.items()]).model


def batch_of(fm, n=4):
    texts = ["markets rallied as the bank cut rates", "the striker scored twice in the final",
             "a new phone with a faster chip", "parliament voted on the budget bill"][:n]
    enc = fm.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=16)
    enc["labels"] = torch.arange(n) % 5
    return enc


def test_nf4_block_sizes():
    assert nf4_blocks(384 * 384) == (64, 256)  # QLoRA's blocks where they divide
    assert nf4_blocks(32 * 32) == (64, 16)  # 16 blocks: the scale blocks shrink to fit
    assert nf4_blocks(96) == (32, 1)
    assert nf4_blocks(7 * 3) is None  # no whole block: the layer is held as int8 instead


@pytest.mark.parametrize("mode, bound", [("int8", 0.5 / 127), ("nf4", 0.35)])
def test_quantized_linear_is_close_to_float32_and_smaller(mode, bound):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.Linear(128, 64))
    ref = [m.weight.detach().clone() for m in model]
    x = torch.randn(8, 256)
    with torch.no_grad():
        y_ref = model(x)
    model.get_input_embeddings = lambda: None  # a bare stack: no embedding table to quantize
    assert quantize_base_(model, mode) == 2
    for m, w in zip(model, ref):
        deq = dequantized(m.weight)
        scale = w.abs().amax(dim=1, keepdim=True)  # per output channel
        # int8: round to nearest of 127 steps of the row's absmax; NF4: 16 levels per block of 64
        assert ((deq - w).abs() <= bound * scale + 1e-6).all()
        assert not m.weight.requires_grad
    with torch.no_grad():
        y = model(x)
    assert torch.allclose(y, y_ref, atol=0.05 if mode == "int8" else 0.5)
    fp32 = sum(w.numel() * 4 for w in ref)
    weights = sum(storage_bytes(m.weight) for m in model)
    # int8: 1 byte per value + a float scale per row; NF4: half a byte + int8 block scales + fp32 per 256 blocks
    assert weights < fp32 / (3.9 if mode == "int8" else 6.0)


def test_quantized_base_counts_and_frozen_parts():
    fm32 = build_model(model_cfg("none"), num_labels=5)
    fm8 = build_model(model_cfg("int8"), num_labels=5)
    emb = fm32.model.get_input_embeddings().weight
    vocab, dim = emb.shape
    # float32, by hand for tiny-bert (vocab 30522, hidden 32, 2 layers, FFN 64, 512 positions): embeddings,
    # per layer q/k/v/o + 2 LayerNorms + FFN, the pooler, peft's frozen copy of the 5-class head, 4 bytes
    # each; and two int64 buffers of 512 (position and token-type ids)
    embeddings = 30522 * 32 + 512 * 32 + 2 * 32 + 2 * 32
    layer = 4 * (32 * 32 + 32) + 2 * 32 + (32 * 64 + 64) + (64 * 32 + 32) + 2 * 32
    frozen32 = model_bytes(fm32.model, trainable=False)
    assert frozen32 == 4 * (embeddings + 2 * layer + (32 * 32 + 32) + (32 * 5 + 5)) + 2 * 8 * 512
    # int8: the embedding table is one byte a value plus one scale (and zero point) a row
    table = fm8.model.get_input_embeddings().weight
    assert vocab * dim <= storage_bytes(table) <= vocab * dim + vocab * 16
    assert model_bytes(fm8.model, trainable=False) < frozen32 / 3
    # what trains and travels is unchanged: same names, shapes and float32
    assert list(fm8.params) == list(fm32.params)
    assert all(fm8.params[k].dtype == torch.float32 and fm8.params[k].shape == v.shape for k, v in fm32.params.items())
    assert model_bytes(fm8.model, trainable=True) == model_bytes(fm32.model, trainable=True)


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_lora_step_through_quantized_base_matches_float32_within_quantization_error(mode):
    fm32 = build_model(model_cfg("none"), num_labels=5, seed=3)
    fmq = build_model(model_cfg(mode), num_labels=5, seed=3)
    for k in fm32.params:  # the same adapter and head to start from
        assert torch.equal(fm32.params[k], fmq.params[k])
    b = batch_of(fm32)
    losses, grads = [], []
    for fm in (fm32, fmq):
        fm.model.train()
        torch.manual_seed(0)
        out = fm.model(**b)
        out.loss.backward()
        losses.append(float(out.loss.detach()))
        grads.append(torch.cat([p.grad.flatten() for p in fm.params.values()]))
    assert all(g.abs().sum() > 0 for g in grads)  # the adapter and head learn through the quantized base
    assert abs(losses[0] - losses[1]) < (0.01 if mode == "int8" else 0.05)
    cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert cos > (0.99 if mode == "int8" else 0.9)


def test_tied_output_layer_shares_the_quantized_table():
    cfg = model_cfg("int8", **{"model.name": "llama-scratch", "model.task": "causal_lm",
                               "model.scratch.tokenizer": "bytes", "model.scratch.layers": 1,
                               "model.scratch.hidden_size": 64, "model.scratch.heads": 2,
                               "model.scratch.tie_embeddings": True})
    fm = build_model(cfg)
    base = fm.model.get_base_model()
    assert base.get_output_embeddings().weight is base.get_input_embeddings().weight
    enc = fm.tokenizer(["to be or not to be"], return_tensors="pt")
    out = fm.model(**enc, labels=enc["input_ids"])
    out.loss.backward()
    assert math.isfinite(float(out.loss))


def test_refusals_are_one_line():
    with pytest.raises(Exception, match="method full trains every weight"):
        model_cfg("int8", **{"model.method": "full"})
    with pytest.raises(Exception, match="should be 'int8', 'nf4' or 'none'"):
        model_cfg("int3")
    cfg = load_config(None, ["model.quantize=nf4", "train.batch_clients=2"])
    from fedfm.client.batched import check_batching

    with pytest.raises(FedfmError, match="model.quantize=nf4"):
        check_batching(cfg)


def test_peak_memory_sees_a_known_allocation():
    with PeakMemory("cpu") as small:
        x = torch.ones(1024)
    del x
    with PeakMemory("cpu") as big:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del x
    assert small.bytes is not None and big.bytes is not None
    assert 60 * 2**20 <= big.bytes <= 80 * 2**20
    assert small.bytes < 8 * 2**20


def test_run_reports_measured_client_memory(tmp_path):
    data = write_topic_csv(tmp_path / "topics.csv")
    over = {"model.name": "tiny-bert", "model.method": "lora", "model.quantize": "nf4", "model.max_length": 16,
            "data.dataset": str(data), "data.max_examples": 60, "federation.num_clients": 3,
            "federation.clients_per_round": 2, "federation.rounds": 2, "train.local_steps": 2, "workers": 1,
            "progress": False, "out": str(tmp_path / "run")}
    summary = fedfm.run(None, [f"{k}={v}" for k, v in over.items()])
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if r.get("round", 0) > 0]
    assert trained and all(0 < r["client_memory_mb_mean"] <= r["client_memory_mb_max"] for r in trained)
    mem = summary["client_memory"]
    assert mem["quantize"] == "nf4"
    # a client holds at least its model; the measured peak adds what training allocates on top
    assert mem["peak_mb_max"] >= mem["base_model_mb"] + mem["trainable_mb"]
    assert mem["peak_mb_max"] == max(r["client_memory_mb_max"] for r in trained)
    fm32 = build_model(model_cfg("none"), num_labels=5)
    assert mem["base_model_mb"] < model_bytes(fm32.model, trainable=False) / 2**20 / 3


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_export_of_a_quantized_run_computes_what_the_clients_trained(tmp_path, mode):
    """``fedfm export`` merges the adapter into the float32 values of the quantized base: the plain
    transformers model it writes gives the run's own logits (fedfm's quantized model) and labels."""
    from transformers import AutoModelForSequenceClassification

    from fedfm.eval.use import load_run
    from fedfm.models.chain import export_run

    data = write_topic_csv(tmp_path / "topics.csv")
    over = {"model.name": "tiny-bert", "model.method": "lora", "model.quantize": mode, "model.max_length": 16,
            "data.dataset": str(data), "data.max_examples": 60, "federation.num_clients": 3,
            "federation.clients_per_round": 2, "federation.rounds": 2, "train.local_steps": 3, "train.lr": 0.05,
            "workers": 1, "progress": False, "out": str(tmp_path / "run")}
    fedfm.run(None, [f"{k}={v}" for k, v in over.items()])
    run = load_run(tmp_path / "run")
    b = batch_of(run.fm)
    b.pop("labels")
    with torch.no_grad():
        ours = run.fm.model(**b).logits
    folder = export_run(tmp_path / "run")
    plain = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        theirs = plain(**b).logits
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    # and it is not the float32 base's model: the quantization error is in the exported weights
    ref = build_model(model_cfg("none"), num_labels=5).model.get_base_model()
    emb = plain.get_input_embeddings().weight
    assert not torch.equal(emb, ref.get_input_embeddings().weight)


def test_a_nodes_reported_memory_is_checked():
    from fedfm.drivers.simulation import memory_record, reported_memory

    assert reported_memory({"memory_mb": 812.5}) == 812.5
    assert reported_memory({"memory_mb": 0}) == 0.0
    for bad in (float("nan"), float("inf"), -1.0, 1e12, "512", True, None, [1]):
        assert reported_memory({"memory_mb": bad}) is None, bad
    assert reported_memory({}) is None
    # the round's record: mean and max of what was measured, nothing for the unmeasured
    assert memory_record([100.0, None, 300.0], [0.5, None]) == {
        "client_memory_mb_mean": 200.0, "client_memory_mb_max": 300.0, "client_step_s": 0.5}
    assert memory_record([None], []) == {}
