"""Every shipped example runs: each file in ``examples/`` (the chain in order), shrunk.

Each config runs as written -- its own model (the packaged MiniLM, or a
from-scratch decoder), data set, algorithm, privacy, attack, continual and
asynchronous settings -- with only its size cut down: two rounds, one local
step of a few rows, short sequences, a few hundred BBC rows and a small test
set, one process. SmolLM2 (135M parameters) is swapped for ``tiny-llama``,
the same Llama architecture at test size, to keep the suite within its time;
its GGUF loading is tested in ``tests/test_models.py``. A new example is picked
up by the glob; one that stops loading, building or running fails here.
(Whether the examples still *learn* what the README says is the job of
``bench/golden_examples.py`` and the benchmarks.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import fedfm
from fedfm.config import load_config

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
CHAIN = sorted((ROOT / "examples" / "chain").glob("0*.yaml"))

pytestmark = pytest.mark.usefixtures("one_thread")


def shrink(path: Path, out: Path, start_from: Path | None = None) -> list[str]:
    """Overrides that keep ``path``'s settings but cut the run to seconds."""
    cfg = load_config(path)
    over = {
        "out": out,
        "progress": "false",
        "workers": 1,
        "threads": 1,
        "federation.rounds": 2,
        "train.local_steps": 1,
        "train.batch_size": 4,
        "model.max_length": 32,
        "eval.every": 0,
        "eval.max_test_examples": 16,
        "eval.batch_size": 16,
    }
    if cfg.model.name == "smollm2":
        over["model.name"] = "tiny-llama"
    if cfg.train.local_epochs is not None:
        over["train.local_epochs"] = "null"
    if cfg.data.dataset == "bbc_news":
        over["data.max_examples"] = 400
    if cfg.continual.enabled:
        over["continual.rounds_per_stage"] = 1
    if cfg.robust.rule == "fltrust":
        over["robust.root_examples"] = 16
    if cfg.federation.clients_per_round < cfg.federation.num_clients:
        over["federation.clients_per_round"] = min(cfg.federation.clients_per_round, 3)
    if cfg.privacy.secure_aggregation.enabled:  # its threshold is sized for the example's cohort
        over.pop("federation.clients_per_round", None)
    if start_from is not None:
        over["model.start_from"] = start_from
    return [f"{k}={v}" for k, v in over.items()]


def finished(out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records and records[-1]["round"] >= 1, records
    assert (out / "final_state.safetensors").stat().st_size > 0
    return summary


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs(path, tmp_path):
    out = tmp_path / path.stem
    summary = fedfm.run(str(path), shrink(path, out))
    assert summary == finished(out)
    assert summary["name"] == load_config(path).name


def test_chain_runs_in_order(tmp_path):
    assert [p.name for p in CHAIN] == ["01_pretrain.yaml", "02_finetune.yaml", "03_prompt.yaml", "04_continual.yaml"]
    previous = None
    for path in CHAIN:
        out = tmp_path / path.stem
        fedfm.run(str(path), shrink(path, out, start_from=previous))
        summary = finished(out)
        if previous is not None:
            assert Path(summary["start_from"]) == previous, summary
        previous = out
