"""Using a trained model without writing Python (issue 15, item 4): ``fedfm eval``, ``fedfm predict``
and the run's peft adapter folder, on tiny models built from configs."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import fedfm
from fedfm.cli import _own_test_rows, app
from fedfm.config import load_config
from fedfm.eval.evaluate import score_examples
from fedfm.eval.use import evaluate_run, load_run, predict_run
from fedfm.data.encode import encode
from fedfm.models import load_into_base
from fedfm.models.adapter import base_for, load_adapter
from fedfm.models.registry import _tiny_config, load_tokenizer, minilm_dir
from fedfm.models.state import load_state, save_state

from test_end_to_end import tiny_cls_overrides, write_topic_csv

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["goal match striker coach the", "chip laptop network server code cloud phone", "bread"]


def _base_folder(path, hidden=32, seed=0):
    """A tiny BERT saved as a plain Hugging Face folder: a base any transformers code can load."""
    from transformers import BertModel

    tok = load_tokenizer(minilm_dir())
    config = _tiny_config("tiny-bert", len(tok), tok.pad_token_id)
    config.hidden_size, config.intermediate_size = hidden, 2 * hidden
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("use")
    data = write_topic_csv(root / "small.csv", n=120)
    return {"root": root, "data": data, "base": _base_folder(root / "base"), "runs": {}}


def run_of(work, method, **extra):
    """One tiny federated run per (method, options), made once per module."""
    key = (method, tuple(sorted(extra.items())))
    if key not in work["runs"]:
        out = work["root"] / f"run-{method}-{len(work['runs'])}"
        options = {"model.name": work["base"], "model.method": method, "federation.rounds": 1,
                   "train.local_steps": 2, "train.lr": 0.5, "eval.every": 0, "out": out, **extra}
        args = [a for a in tiny_cls_overrides(work["root"], **options) if not a.startswith("data.dataset=")]
        fedfm.run(None, [*args, f"data.dataset={work['data']}"])
        work["runs"][key] = out
    return work["runs"][key]


def _spread(work, method, texts):
    """A copy of the method's run whose final state is noisy, its head centred on ``texts``' features
    (same names and metadata): predictions that vary by row."""
    import shutil

    run = work["root"] / f"spread-{method}"
    if run.exists():
        return run
    shutil.copytree(run_of(work, method), run)
    path = run / "final_state.safetensors"
    state, meta = load_state(path)
    g = torch.Generator().manual_seed(0)
    state = {k: v + 0.5 * torch.randn(v.shape, generator=g) for k, v in state.items()}
    save_state(state, path, metadata=meta)
    trained, feats = load_run(run), []
    head = trained.fm.model.base_model.model.classifier
    hook = head.register_forward_pre_hook(lambda module, args: feats.append(args[0]))
    _plain_logits(trained.fm.model, trained.fm.tokenizer, texts)
    hook.remove()
    features = torch.cat(feats)
    w = 10 * torch.randn(state["classifier.weight"].shape, generator=g) / features.std(0).clamp(min=1e-6)
    state["classifier.weight"], state["classifier.bias"] = w, -(features.mean(0) @ w.T)
    save_state(state, path, metadata=meta)
    return run


def _plain_logits(model, tokenizer, texts, max_length=16):
    """Row by row (no padding), the model as it stands."""
    model.eval()
    out = []
    with torch.no_grad():
        for t in texts:
            enc = tokenizer(t, truncation=True, max_length=max_length, return_tensors="pt")
            out.append(model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[0])
    return torch.stack(out)


def _batch(tokenizer, texts):
    enc = tokenizer(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


# ----------------------------------------------------------------------------- eval


def test_eval_on_a_file_matches_a_plain_pytorch_evaluation(work, tmp_path):
    # a file with two of the run's three labels, in another order, under other column names, as JSON lines
    rows = [{"body": t, "topic": lab} for t, lab in zip(
        ["goal keeper season", "cloud code robot phone", "referee penalty the", "server chip", "league a year",
         "browser laptop people", "stadium coach", "network report"], ["sport", "tech"] * 4)]
    run = _spread(work, "lora", [r["body"] for r in rows])
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = evaluate_run(load_run(run, ["data.text_column=body", "data.label_column=topic"]), str(path))

    cfg = load_config(run / "config.yaml")
    fm = load_into_base(cfg.model, 3, run / "final_state.safetensors")
    logits = _plain_logits(fm.model, fm.tokenizer, [r["body"] for r in rows])
    names = ["food", "sport", "tech"]  # the run's labels, sorted as the run numbered them
    y = torch.tensor([names.index(r["topic"]) for r in rows])
    pred = logits.argmax(-1)
    assert result["rows"] == 8
    assert result["metrics"]["loss"] == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-6)
    assert result["metrics"]["accuracy"] == pytest.approx(float((pred == y).float().mean()))
    assert len(set(pred.tolist())) > 1  # the noisy state tells rows apart: the table is not trivial
    for c, row in enumerate(result["classes"]):
        tp = int(((pred == c) & (y == c)).sum())
        precision = tp / max(int((pred == c).sum()), 1)
        recall = tp / max(int((y == c).sum()), 1)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        assert row["label"] == names[c] and row["support"] == int((y == c).sum())
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx((precision, recall, f1))

    # the CLI prints the same and writes it with --json
    out = tmp_path / "eval.json"
    res = CliRunner().invoke(app, ["eval", str(run), "--data", str(path), "--json", str(out), "--device", "cpu",
                                   "data.text_column=body", "data.label_column=topic"])
    assert res.exit_code == 0, res.output
    assert "precision" in res.output and "macro avg" in res.output
    assert json.loads(out.read_text())["metrics"] == pytest.approx(result["metrics"])


def test_eval_on_the_runs_own_test_set_reproduces_its_final_metrics(work):
    run = run_of(work, "lora")
    summary = json.loads((run / "summary.json").read_text())
    result = evaluate_run(load_run(run), None, _own_test_rows)
    assert result["metrics"]["loss"] == pytest.approx(summary["final"]["test_loss"], abs=1e-6)
    assert result["metrics"]["accuracy"] == pytest.approx(summary["final"]["test_accuracy"])
    assert sum(c["support"] for c in result["classes"]) == result["rows"] == 24  # 20% of 120


# ----------------------------------------------------------------------------- predict


def test_predict_probabilities_are_the_softmax_of_the_models_logits(work, tmp_path):
    run = _spread(work, "ia3", TEXTS)
    trained = load_run(run)
    records = predict_run(trained, texts=TEXTS, batch_size=2)  # batched and padded
    probs = torch.softmax(_plain_logits(trained.fm.model, trained.fm.tokenizer, TEXTS), -1)
    names = ["food", "sport", "tech"]
    for r, p in zip(records, probs):
        assert [r["probabilities"][n] for n in names] == pytest.approx(p.tolist(), abs=1e-6)
        assert r["label"] == names[int(p.argmax())] and r["probability"] == pytest.approx(float(p.max()), abs=1e-6)

    # the CLI: every row of a file to JSON lines and CSV, the text column overridden
    df = pd.DataFrame({"body": TEXTS * 3})
    df.to_csv(tmp_path / "in.csv", index=False)
    for suffix in (".jsonl", ".csv"):
        out = tmp_path / f"pred{suffix}"
        res = CliRunner().invoke(app, ["predict", str(run), "--data", str(tmp_path / "in.csv"), "--out", str(out),
                                       "--device", "cpu", "data.text_column=body"])
        assert res.exit_code == 0, res.output
        got = (pd.read_json(out, lines=True) if suffix == ".jsonl" else pd.read_csv(out))
        assert list(got["text"]) == TEXTS * 3
        p = np.array([[row[f"p_{n}"] for n in names] for _, row in got.iterrows()]) if suffix == ".csv" else \
            np.array([[d[n] for n in names] for d in got["probabilities"]])
        assert p == pytest.approx(np.tile(probs.numpy(), (3, 1)), abs=1e-6)


# ----------------------------------------------------------------------------- the adapter folder


@pytest.mark.parametrize("method", ["lora", "ia3", "prompt", "prefix"])
def test_the_adapter_folder_rebuilds_the_runs_model_in_plain_peft(work, method):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run = run_of(work, method)  # train.lr=0.5: the adapter moves far from its init
    folder = run / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in folder.iterdir()}
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == str(work["base"])
    assert json.loads((folder / "fedfm_adapter.json").read_text())["needs_fedfm_hooks"] == (method == "prefix")
    trained = load_run(run)
    tok = AutoTokenizer.from_pretrained(str(work["base"]))
    batch = _batch(tok, TEXTS)
    with torch.no_grad():
        ours = trained.fm.model(**batch).logits
        base = AutoModelForSequenceClassification.from_pretrained(str(work["base"]), num_labels=3)
        fresh = base(**batch).logits
        plain = PeftModel.from_pretrained(base, str(folder)).eval()
        assert (ours - fresh).abs().max() > 1e-3  # the adapter and head change the model
        if method != "prefix":
            assert (plain(**batch).logits - ours).abs().max() < 1e-5
        else:  # peft 0.21 cannot hand a prefix to a transformers 5 model: the weights load, fedfm's hook runs them
            state, _ = load_state(run / "final_state.safetensors")
            assert torch.equal(plain.prompt_encoder["default"].embedding.weight, state["prompt_encoder.embedding.weight"])
        hooked = load_adapter(folder)  # the base rebuilt from fedfm_adapter.json, fedfm's hooks on
        assert (hooked(**batch).logits - ours).abs().max() < 1e-5


def test_mean_pooling_needs_fedfms_hook_and_full_runs_have_no_adapter(work):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run = run_of(work, "lora", **{"model.pooling": "mean"})
    info = json.loads((run / "adapter" / "fedfm_adapter.json").read_text())
    assert info["pooling"] == "mean" and info["needs_fedfm_hooks"] and info["label_names"] == ["food", "sport", "tech"]
    batch = _batch(AutoTokenizer.from_pretrained(str(work["base"])), TEXTS)
    with torch.no_grad():
        ours = load_run(run).fm.model(**batch).logits
        assert (load_adapter(run / "adapter")(**batch).logits - ours).abs().max() < 1e-5
        base = AutoModelForSequenceClassification.from_pretrained(str(work["base"]), num_labels=3)
        plain = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
        assert (plain(**batch).logits - ours).abs().max() > 1e-4  # the pooler, not the mean: not the run's model
    assert not (run_of(work, "full") / "adapter").exists()


# ----------------------------------------------------------------------------- causal LM


def test_causal_lm_eval_predict_and_adapter(work, tmp_path):
    from peft import PeftModel

    lines = tmp_path / "lines.jsonl"
    lines.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["to be or not to be that is the question",
                                                                       "all the world is a stage"] * 20))
    out = tmp_path / "lm"
    fedfm.run(None, ["model.name=tiny-llama", "model.task=causal_lm", "model.method=prefix", "model.max_length=16",
                     f"data.dataset={lines}", "data.label_column=null", "federation.partition.scheme=iid", "federation.num_clients=2",
                     "federation.clients_per_round=2", "federation.rounds=1", "train.local_steps=2", "train.lr=0.5",
                     "eval.every=0", "progress=false", f"out={out}"])
    summary = json.loads((out / "summary.json").read_text())
    trained = load_run(out)
    result = evaluate_run(trained, None, _own_test_rows)
    assert result["metrics"]["loss"] == pytest.approx(summary["final"]["test_loss"], abs=1e-6)
    assert result["metrics"]["perplexity"] == pytest.approx(math.exp(result["metrics"]["loss"]))

    fm = trained.fm
    on_file = evaluate_run(trained, str(lines))
    enc = encode([json.loads(x)["text"] for x in lines.read_text().splitlines()], fm.tokenizer, 16)
    ref = score_examples(fm, enc, np.arange(len(enc)), 7)
    assert on_file["metrics"]["loss"] == pytest.approx(ref.loss_sum.sum() / ref.targets.sum(), abs=1e-6)

    prompts = ["all the world", "to be or not to be that"]
    records = predict_run(trained, texts=prompts, max_new_tokens=3)  # one padded batch
    for prompt, rec in zip(prompts, records):
        ids = fm.tokenizer(prompt, return_tensors="pt")["input_ids"][:, :-1]  # without the closing [SEP]
        with torch.no_grad():  # greedy decoding by hand, row alone: the arg max, appended, three times
            for _ in range(3):
                nxt = fm.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].argmax()
                ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        assert rec["generated"] == fm.tokenizer.decode(ids[0, -3:], skip_special_tokens=True)

    info = json.loads((out / "adapter" / "fedfm_adapter.json").read_text())
    assert info["base"] == "tiny-llama" and info["base_random_init"]
    with torch.no_grad():
        batch = {k: v for k, v in fm.tokenizer(["to be or not", "all the"], padding=True, return_tensors="pt").items()
                 if k in ("input_ids", "attention_mask")}
        ours = fm.model(**batch).logits
        assert (load_adapter(out / "adapter")(**batch).logits - ours).abs().max() < 1e-5
        # a causal LM's prefix needs no fedfm hook: plain peft on the same base gives the run's logits
        plain = PeftModel.from_pretrained(base_for(info), str(out / "adapter")).eval()
        assert (plain(**batch).logits - ours).abs().max() < 1e-5
    assert not info["needs_fedfm_hooks"]


# ----------------------------------------------------------------------------- bad inputs


def _one_line_error(args) -> str:
    res = CliRunner().invoke(app, [*args, "--device", "cpu"])
    lines = res.output.strip().splitlines()
    assert res.exit_code != 0 and len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert "Traceback" not in res.output
    return lines[0]


def test_bad_inputs_give_one_line_and_a_nonzero_exit(work, tmp_path):
    run = str(run_of(work, "full"))
    assert "not a fedfm run folder" in _one_line_error(["eval", str(tmp_path)])
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((work["runs"][("full", ())] / "config.yaml").read_text())
    assert "unfinished run" in _one_line_error(["predict", str(unfinished), "--text", "hi"])

    (tmp_path / "empty.csv").write_text("text,label\n")
    assert "no rows" in _one_line_error(["eval", run, "--data", str(tmp_path / "empty.csv")])
    pd.DataFrame({"text": ["a goal", "a chip"], "label": ["sport", "politics"]}).to_csv(tmp_path / "f.csv", index=False)
    assert "'body' not in" in _one_line_error(["eval", run, "--data", str(tmp_path / "f.csv"), "data.text_column=body"])
    assert "politics" in _one_line_error(["eval", run, "--data", str(tmp_path / "f.csv")])
    other = _base_folder(tmp_path / "other", hidden=48)
    assert "does not match the run" in _one_line_error(["eval", run, f"model.name={other}"])
    assert "either --data" in _one_line_error(["predict", run])
    assert "either --data" in _one_line_error(["predict", run, "--text", "a", "--data", str(tmp_path / "f.csv")])
    assert ".jsonl or .csv" in _one_line_error(["predict", run, "--text", "a", "--out", str(tmp_path / "p.txt")])
    assert "unknown key" in _one_line_error(["eval", run, "data.nope=1"])
