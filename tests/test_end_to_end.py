"""End-to-end runs on tiny random-init models and small local files."""

import json
import random

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import fedfm
from fedfm.cli import app
from fedfm.config import load_config
from fedfm.data.encode import encode
from fedfm.eval.evaluate import score_examples
from fedfm.models import load_into_base

VOCAB = {
    "sport": "goal match striker coach league penalty keeper referee stadium season".split(),
    "tech": "software chip laptop network server browser robot code cloud phone".split(),
    "food": "bread cheese recipe oven garlic pasta butter salad sugar soup".split(),
}
SHARED = "the a of and today new report people year said".split()


def write_topic_csv(path, n=360, seed=0):
    rng = random.Random(seed)
    rows = ["text,label"]
    names = list(VOCAB)
    for i in range(n):
        label = names[i % 3]
        words = rng.choices(VOCAB[label], k=6) + rng.choices(SHARED, k=6)
        rng.shuffle(words)
        rows.append(f"{' '.join(words)},{label}")
    path.write_text("\n".join(rows) + "\n")
    return path


def tiny_cls_overrides(tmp_path, **extra):
    data = write_topic_csv(tmp_path / "topics.csv")
    base = {
        "model.name": "tiny-bert",
        "model.method": "full",
        "model.max_length": 16,
        "data.dataset": str(data),
        "federation.num_clients": 6,
        "federation.clients_per_round": 3,
        "federation.rounds": 6,
        "federation.partition.alpha": 1.0,
        "train.local_steps": 8,
        "train.lr": 0.01,
        "eval.every": 3,
        "progress": False,
        "out": str(tmp_path / "run"),
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def test_tiny_classification_learns_above_chance_and_writes_outputs(tmp_path):
    summary = fedfm.run(None, tiny_cls_overrides(tmp_path))
    out = tmp_path / "run"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == list(range(0, 7))
    assert records[0]["test_accuracy"] < 0.6  # random init: near chance (1/3)
    assert summary["final_accuracy"] > 0.8, summary  # chance is 1/3
    assert summary["final_accuracy"] == records[-1]["test_accuracy"]
    # bytes: every round sends the full state down and up to each of 3 clients
    assert records[-1]["bytes_up_total"] == sum(r["bytes_up"] for r in records)
    assert records[1]["bytes_down"] > 3 * summary["trainable_state_bytes"]
    assert {"client_accuracy_mean", "client_accuracy_worst10", "client_accuracy_std"} <= set(records[-1])
    for name in ("config.yaml", "partition.json", "summary.json", "final_state.safetensors", "metrics.png"):
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "summary.json").read_text())["rounds"] == 6

    # the saved state loads back into a freshly built base model and scores the same
    cfg = load_config(out / "config.yaml")
    fm = load_into_base(cfg.model, 3, out / "final_state.safetensors")
    import pandas as pd

    df = pd.read_csv(tmp_path / "topics.csv")
    names = sorted(VOCAB)
    enc = encode(df.text.tolist(), fm.tokenizer, 16, np.array([names.index(x) for x in df.label]))
    scores = score_examples(fm, enc, np.arange(len(df)), 64)
    assert scores.correct.mean() > 0.8


def test_same_seed_same_result_and_other_seed_differs(tmp_path):
    a = fedfm.run(None, tiny_cls_overrides(tmp_path, **{"federation.rounds": 2, "out": tmp_path / "a"}))
    b = fedfm.run(None, tiny_cls_overrides(tmp_path, **{"federation.rounds": 2, "out": tmp_path / "b"}))
    fedfm.run(None, tiny_cls_overrides(tmp_path, **{"federation.rounds": 2, "out": tmp_path / "c", "seed": 1}))
    from fedfm.models.state import load_state

    sa, _ = load_state(tmp_path / "a" / "final_state.safetensors")
    sb, _ = load_state(tmp_path / "b" / "final_state.safetensors")
    sc, _ = load_state(tmp_path / "c" / "final_state.safetensors")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert a["final"]["test_loss"] == b["final"]["test_loss"]


@pytest.mark.parametrize("method", ["lora", "ia3", "prompt", "prefix"])
def test_peft_methods_only_send_the_trainable_state(tmp_path, method):
    s = fedfm.run(
        None,
        tiny_cls_overrides(
            tmp_path, **{"model.method": method, "federation.rounds": 1, "train.local_steps": 2, "eval.every": 0}
        ),
    )
    assert s["trainable_params"] < s["total_params"] / 2
    # one round, 3 clients: each upload is the state plus a small safetensors header
    per_upload = s["bytes_up_total"] / 3
    assert s["trainable_state_bytes"] < per_upload < s["trainable_state_bytes"] + 20_000


def test_tiny_causal_lm_perplexity_drops(tmp_path):
    lines = ["to be or not to be that is the question", "all the world is a stage and all the men players"]
    text = tmp_path / "lines.jsonl"
    rng = random.Random(0)
    with text.open("w") as fh:
        for i in range(240):
            fh.write(json.dumps({"text": lines[i % 2], "speaker": f"r{rng.randrange(4)}"}) + "\n")
    s = fedfm.run(
        None,
        [
            "model.name=tiny-llama",
            "model.task=causal_lm",
            "model.method=full",
            "model.max_length=16",
            f"data.dataset={text}",
            "data.label_column=null",
            "data.group_column=speaker",
            "federation.num_clients=4",
            "federation.clients_per_round=2",
            "federation.rounds=4",
            "federation.partition.scheme=natural",
            "train.local_steps=10",
            "train.lr=0.01",
            "eval.every=4",
            "progress=false",
            f"out={tmp_path / 'lm'}",
        ],
    )
    records = [json.loads(x) for x in (tmp_path / "lm" / "metrics.jsonl").read_text().splitlines()]
    assert s["metric"] == "perplexity"
    assert records[0]["test_perplexity"] > 1000  # random init over a 30k vocabulary
    assert s["final_perplexity"] < 0.01 * records[0]["test_perplexity"]


runner = CliRunner()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["run", "model.name=/no/such/model"], "model not found"),
        (["run", "data.dataset=/no/such/file.csv"], "not found"),
        (["run", "train.lrr=3"], "unknown key 'train.lrr'"),
        (["run", "model.method=bitfit"], "model.method"),
        (["run", "algorithm.name=fednope"], "algorithm.name"),
        (["run", "missing.yaml"], "config file not found"),
    ],
)
def test_cli_bad_input_is_one_error_line(args, fragment):
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    lines = [x for x in res.output.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], res.output


def test_cli_missing_columns_and_too_many_clients(tmp_path):
    csv = write_topic_csv(tmp_path / "t.csv", n=30)
    res = runner.invoke(app, ["run", "model.name=tiny-bert", f"data.dataset={csv}", "data.text_column=body", "progress=false"])
    assert res.exit_code == 2 and "body" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["run", "model.name=tiny-bert", f"data.dataset={csv}", "data.label_column=topic", "progress=false"])
    assert res.exit_code == 2 and "topic" in res.output
    res = runner.invoke(
        app,
        ["run", "model.name=tiny-bert", f"data.dataset={csv}", "federation.num_clients=50", "federation.clients_per_round=5", "progress=false"],
    )
    assert res.exit_code == 2 and "50" in res.output and "Traceback" not in res.output


def test_client_dp_run_reports_epsilon_and_stops_at_the_budget(tmp_path):
    from fedfm.privacy.accountant import compute_epsilon

    over = tiny_cls_overrides(
        tmp_path,
        **{
            "federation.rounds": 5,
            "eval.every": 0,
            "privacy.client_dp.enabled": True,
            "privacy.client_dp.noise_multiplier": 1.0,
            "privacy.client_dp.clip_norm": 0.5,
            "privacy.client_dp.delta": 1e-3,
        },
    )
    # budget: what 3 rounds cost, so the 4th must not run
    eps3 = compute_epsilon(1.0, 3 / 6, 1e-3, 3)
    s = fedfm.run(None, over + [f"privacy.client_dp.target_epsilon={eps3 * 1.0001}"])
    assert s["rounds"] == 3 and "privacy budget" in s["stop_reason"]
    assert s["privacy"]["epsilon"] == pytest.approx(eps3)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2, 3]
    assert records[0]["dp_epsilon"] < records[2]["dp_epsilon"]
    assert records[0]["dp_clip_norm"] == 0.5


def test_client_dp_noise_multiplier_from_target_epsilon(tmp_path):
    from fedfm.privacy.accountant import compute_epsilon

    over = tiny_cls_overrides(
        tmp_path,
        **{"federation.rounds": 4, "eval.every": 0, "privacy.client_dp.enabled": True, "privacy.client_dp.target_epsilon": 4.0},
    )
    s = fedfm.run(None, over)
    p = s["privacy"]
    assert s["rounds"] == 4 and p["delta"] == pytest.approx(1e-5)
    assert p["epsilon"] <= 4.0 and p["epsilon"] == pytest.approx(4.0, rel=0.01)
    assert compute_epsilon(p["noise_multiplier"], 0.5, 1e-5, 4) == pytest.approx(p["epsilon"])


def test_client_dp_refuses_scaffold(tmp_path):
    res = runner.invoke(
        app,
        ["run", *tiny_cls_overrides(tmp_path, **{"algorithm.name": "scaffold", "privacy.client_dp.enabled": True, "privacy.client_dp.noise_multiplier": 1.0})],
    )
    assert res.exit_code == 2 and "privacy.client_dp" in res.output


def _attack_run(tmp_path, name, **extra):
    over = {
        "federation.num_clients": 10,
        "federation.clients_per_round": 10,
        "federation.rounds": 5,
        "federation.partition.scheme": "iid",
        "eval.every": 0,
        "eval.clients": False,
        "out": tmp_path / name,
    }
    over.update(extra)
    return fedfm.run(None, tiny_cls_overrides(tmp_path, **over))


def test_sign_flip_attack_breaks_fedavg_and_median_defends(tmp_path):
    clean = _attack_run(tmp_path, "clean")
    attack = {"attack.name": "sign_flip", "attack.fraction": 0.3, "attack.scale": 4.0}
    hit = _attack_run(tmp_path, "hit", **attack)
    defended = _attack_run(tmp_path, "defended", **attack, **{"robust.rule": "median", "robust.num_byzantine": 3})
    assert len(hit["malicious_clients"]) == 3
    assert clean["final_accuracy"] > 0.8
    assert hit["final_accuracy"] < clean["final_accuracy"] - 0.2, (clean, hit)
    assert defended["final_accuracy"] > clean["final_accuracy"] - 0.1, (clean, defended)


def test_krum_rejects_too_many_byzantine_for_the_cohort(tmp_path):
    res = runner.invoke(
        app,
        ["run", *tiny_cls_overrides(tmp_path, **{"robust.rule": "krum", "robust.num_byzantine": 2, "federation.rounds": 1})],
    )
    assert res.exit_code == 2, res.output
    assert res.output.strip() == "error: robust.rule=krum needs n > 2f + 2 clients per round; got n=3, f=2 (robust.num_byzantine)"
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before any round ran
