"""Federated pre-training: DiLoCo's outer optimizer, the from-scratch Llama, text corpora, a tiny run."""

from __future__ import annotations

import json
import math
from collections import OrderedDict

import numpy as np
import pytest
import torch

from fedfm.algorithms import Update, build_algorithm
from fedfm.algorithms.fedopt import ServerNesterov
from fedfm.config import load_config
from fedfm.config.schema import AlgorithmConfig, DataConfig, ModelConfig
from fedfm.data.partition import partition
from fedfm.data.sources import load_text_dataset, split_text
from fedfm.errors import FedfmError

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- DiLoCo outer optimizer


def test_nesterov_two_steps_by_hand():
    # v <- mu v + delta ; x <- x + lr (delta + mu v), with lr 0.7 and mu 0.9 (DiLoCo's defaults)
    opt = ServerNesterov(lr=0.7, momentum=0.9)
    x = OrderedDict(w=torch.tensor([1.0, -2.0], dtype=torch.float64))
    x1 = opt.step(x, {"w": torch.tensor([0.5, 0.0], dtype=torch.float64)})
    # v1 = 0.5 ; x1 = 1 + 0.7 (0.5 + 0.45) = 1.665 (second coordinate: no change)
    assert torch.allclose(x1["w"], torch.tensor([1.665, -2.0], dtype=torch.float64))
    x2 = opt.step(x1, {"w": torch.tensor([-0.2, 1.0], dtype=torch.float64)})
    # v2 = 0.45 - 0.2 = 0.25 ; x2 = 1.665 + 0.7 (-0.2 + 0.225) = 1.6825
    # second coordinate: v2 = 1 ; x2 = -2 + 0.7 (1 + 0.9) = -0.67
    assert torch.allclose(x2["w"], torch.tensor([1.6825, -0.67], dtype=torch.float64))
    assert torch.equal(x["w"], torch.tensor([1.0, -2.0], dtype=torch.float64))  # inputs untouched


def test_nesterov_matches_torch_sgd_on_minus_delta():
    gen = torch.Generator().manual_seed(0)
    start = OrderedDict(a=torch.randn(3, 4, generator=gen, dtype=torch.float64), b=torch.randn(5, generator=gen, dtype=torch.float64))
    deltas = [OrderedDict((k, torch.randn(v.shape, generator=gen, dtype=torch.float64)) for k, v in start.items()) for _ in range(5)]
    ours = ServerNesterov(lr=0.3, momentum=0.8)
    x = start
    ref = [torch.nn.Parameter(v.clone()) for v in start.values()]
    sgd = torch.optim.SGD(ref, lr=0.3, momentum=0.8, nesterov=True)
    for d in deltas:
        x = ours.step(x, d)
        for p, dk in zip(ref, d.values()):
            p.grad = -dk  # the pseudo-gradient
        sgd.step()
    for p, k in zip(ref, x):
        assert torch.allclose(x[k], p.detach(), atol=1e-12)


def test_diloco_registered_with_paper_defaults_and_folds_the_mean():
    cfg = AlgorithmConfig(name="diloco")
    assert (cfg.server_lr, cfg.momentum) == (0.7, 0.9)  # Douillard et al. 2023
    assert AlgorithmConfig(name="diloco", server_lr=1.0).server_lr == 1.0  # an explicit value wins
    assert AlgorithmConfig(name="fedavg").server_lr == 1.0  # other algorithms unchanged
    algo = build_algorithm(cfg, num_clients=2)
    assert algo.name == "diloco"
    g = OrderedDict(w=torch.tensor([0.0, 1.0]))
    algo.start(g, 0)
    algo.add(Update(client_id=0, delta=OrderedDict(w=torch.tensor([1.0, 0.0])), num_examples=1))
    algo.add(Update(client_id=1, delta=OrderedDict(w=torch.tensor([0.0, 2.0])), num_examples=3))
    new = algo.finish()
    mean = torch.tensor([0.25, 1.5])  # example-weighted mean delta
    assert torch.allclose(new["w"], g["w"] + 0.7 * (mean + 0.9 * mean))


# --------------------------------------------------------------------------- from-scratch Llama


def _scratch_cfg(**shape) -> ModelConfig:
    scratch = dict(layers=2, hidden_size=32, heads=4, kv_heads=2, intermediate_size=48, tokenizer="bytes")
    scratch.update(shape)
    return ModelConfig(name="llama-scratch", task="causal_lm", method="full", max_length=32, scratch=scratch)


def test_scratch_llama_has_the_configured_shape_and_trains_whole():
    from fedfm.models import build_model

    fm = build_model(_scratch_cfg())
    c = fm.model.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.num_attention_heads) == ("llama", 2, 32, 4)
    assert (c.num_key_value_heads, c.intermediate_size, c.vocab_size) == (2, 48, 259)  # 256 bytes + 3 specials
    assert len(fm.model.model.layers) == 2
    # parameters by hand: tied embedding V*h; per layer q,o h*h, k,v h*(kv*head_dim), SwiGLU 3*h*I, 2 norms; final norm
    v, h, i, kv = 259, 32, 48, 2 * (32 // 4)
    expected = v * h + 2 * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + h
    assert sum(p.numel() for p in fm.params.values()) == expected
    assert sum(p.numel() for p in fm.model.parameters()) == expected  # the whole model is the trainable state
    assert all(p.requires_grad for p in fm.model.parameters())
    again = build_model(_scratch_cfg())  # a fixed init: every process builds the same model
    assert all(torch.equal(p, again.params[k]) for k, p in fm.params.items())
    untied = build_model(_scratch_cfg(tie_embeddings=False))
    assert sum(p.numel() for p in untied.params.values()) == expected + v * h


def test_scratch_config_errors():
    with pytest.raises(ValueError, match="not divisible by heads"):
        _scratch_cfg(hidden_size=30)
    with pytest.raises(ValueError, match="applies to name=llama-scratch"):
        ModelConfig(name="tiny-llama", scratch={"layers": 3})


# --------------------------------------------------------------------------- plain-text corpora


def test_split_text_paragraphs_and_lines():
    text = "A one.\r\nA two.\n \nB one.\n\n\n  C one.  \n"
    assert split_text(text, "paragraph") == ["A one.\nA two.", "B one.", "C one."]
    assert split_text(text, "line") == ["A one.", "A two.", "B one.", "C one."]


def test_text_folder_loads_and_partitions_by_file(tmp_path):
    (tmp_path / "north.txt").write_text("n1 first\nstill n1\n\nn2\n\nn3\n")
    (tmp_path / "deep").mkdir()
    (tmp_path / "deep" / "south.txt").write_text("s1\n\ns2\n")
    (tmp_path / "notes.md").write_text("not a text file\n")
    ds = load_text_dataset(DataConfig(dataset=str(tmp_path)), "causal_lm")
    assert ds.texts == ["s1", "s2", "n1 first\nstill n1", "n2", "n3"]  # files in sorted path order
    assert ds.groups == ["deep/south.txt"] * 2 + ["north.txt"] * 3
    assert ds.labels is None
    parts = partition(2, "natural", num_examples=len(ds), groups=ds.groups, min_examples=1)
    assert sorted(tuple(p) for p in parts) == [(0, 1), (2, 3, 4)]  # one client per file
    lines = load_text_dataset(DataConfig(dataset=str(tmp_path / "north.txt"), text_unit="line"), "causal_lm")
    assert lines.texts == ["n1 first", "still n1", "n2", "n3"] and set(lines.groups) == {"north.txt"}


def test_text_corpus_errors_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "blank.txt").write_text("\n \n")
    for path, message in [
        (tmp_path / "missing.txt", "data file not found"),
        (tmp_path / "empty", "no .txt files in folder"),
        (tmp_path / "blank.txt", "no text in"),
    ]:
        with pytest.raises(FedfmError, match=message) as err:
            load_text_dataset(DataConfig(dataset=str(path)), "causal_lm")
        assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- a tiny federated pre-training run


def test_tiny_diloco_pretraining_reports_perplexity_and_bytes(tmp_path):
    from fedfm.runner import run

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    words = ["thee", "thou", "love", "night", "sword", "crown", "king", "fair"]
    for name in ("alpha", "beta"):
        paras = [" ".join(rng.choice(words, 6)) for _ in range(24)]
        (corpus / f"{name}.txt").write_text("\n\n".join(paras))
    cfg = load_config("examples/pretrain.yaml", [
        f"data.dataset={corpus}", "data.test_fraction=0.2", "data.client_test_fraction=0.1",
        "model.max_length=32", "model.scratch.layers=1", "model.scratch.hidden_size=16", "model.scratch.heads=2",
        "model.scratch.intermediate_size=32", "federation.num_clients=2", "federation.clients_per_round=2",
        "federation.rounds=2", "train.local_steps=3", "train.batch_size=4", "eval.every=1",
        "progress=false", f"out={tmp_path / 'run'}",
    ])
    summary = run(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    for r in records:  # validation perplexity every round, = exp(mean token loss)
        assert math.isclose(r["test_perplexity"], math.exp(r["test_loss"]), rel_tol=1e-9)
    assert records[-1]["test_perplexity"] < records[0]["test_perplexity"]  # it learns
    assert summary["algorithm"] == "diloco" and summary["metric"] == "perplexity"
    assert summary["final_perplexity"] == records[-1]["test_perplexity"]
    # bytes: the whole model goes down to and up from both clients in both rounds (safetensors + small header)
    state = summary["trainable_state_bytes"]
    assert state == 4 * summary["trainable_params"] == 4 * summary["total_params"]
    assert summary["bytes_up_total"] == sum(r["bytes_up"] for r in records[1:]) == records[-1]["bytes_up_total"]
    for key in ("bytes_up_total", "bytes_down_total"):
        assert 4 * state <= summary[key] < 4 * (state + 16_384)
