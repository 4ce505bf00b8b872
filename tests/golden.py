"""Behaviour lock: tiny runs whose final state and metrics must not change under refactoring.

Each scenario is one feature path of a run (an algorithm, a privacy or
robustness wrapper, a codec, a driver) on a tiny random-init model and a small
local CSV, a couple of rounds long. ``python tests/golden.py --record`` runs
them all and writes ``tests/golden/<name>.json`` (sha256 of the final state's
tensors, the final metrics, the per-round records) and
``tests/golden/<name>.safetensors`` (the final state itself, a few KB: the
tolerance check of ``tests/test_golden.py`` compares against it where the
float summation order legitimately changes).

The values were recorded on the code as it was before the Server/Client
refactor (issue 13), so the test proves that refactor changed no behaviour,
and every later change that moves a number has to re-record and say why.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path

import torch

from fedfm.client.peak_memory import MEASURED_KEYS
from safetensors.torch import load_file, save_file

HERE = Path(__file__).parent
GOLDEN = HERE / "golden"

WORDS = {
    "sport": "goal match striker coach league penalty keeper referee stadium season".split(),
    "tech": "software chip laptop network server browser robot code cloud phone".split(),
    "food": "bread cheese recipe oven garlic pasta butter salad sugar soup".split(),
    "music": "guitar album concert band song singer drum piano chorus tour".split(),
}
SHARED = "the a of and today new report people year said".split()

# A fleet of devices on the virtual clock (HetLoRA rank 2 on the slow third).
FLEET = (
    "[{name: fast, share: 0.5, speed: 1.0, link_mbps: 20}, "
    "{name: slow, share: 0.5, speed: 0.25, link_mbps: 2, dropout: 0.2, lora_rank: 2}]"
)

# name -> overrides on top of BASE; every path the Server/Client refactor touches.
SCENARIOS: dict[str, dict] = {
    "fedavg_lora": {},
    "fedavg_uniform_ema": {"algorithm.weighting": "uniform", "algorithm.ema_decay": 0.5},
    "fedprox": {"algorithm.name": "fedprox", "algorithm.mu": 0.1},
    "scaffold": {"algorithm.name": "scaffold", "train.optimizer": "sgd", "train.lr": 0.05},
    "fedadam_client_dp": {
        "algorithm.name": "fedadam", "algorithm.server_lr": 0.05,
        "privacy.client_dp.enabled": True, "privacy.client_dp.noise_multiplier": 0.2,
        "privacy.client_dp.clip_norm": 0.5, "privacy.client_dp.adaptive": True, "privacy.reproducible_noise": True,
    },
    "diloco": {"algorithm.name": "diloco", "algorithm.server_lr": 0.7},
    "secagg_dropout": {
        "federation.clients_per_round": 6, "privacy.secure_aggregation.enabled": True,
        "privacy.secure_aggregation.dropout": 0.2,
    },
    "int8_topk_error_feedback": {
        "compression.upload": "[topk,int8]", "compression.download": "[fp16]",
        "compression.topk_fraction": 0.5, "compression.chunk_size": 16, "compression.error_feedback": True,
    },
    "trimmed_mean_sign_flip": {
        "federation.clients_per_round": 5, "attack.name": "sign_flip", "attack.fraction": 0.34,
        "attack.scale": 4.0, "robust.rule": "trimmed_mean", "robust.trim_fraction": 0.2, "robust.num_byzantine": 1,
    },
    "krum_alie": {
        "federation.clients_per_round": 5, "attack.name": "alie", "attack.fraction": 0.2,
        "robust.rule": "krum", "robust.num_byzantine": 1,
    },
    "fltrust_sign_flip": {
        "attack.name": "sign_flip", "attack.fraction": 0.34, "robust.rule": "fltrust", "robust.root_examples": 20,
        "train.local_steps": 8,
    },
    "backdoor_norm_bound": {
        "attack.name": "backdoor", "attack.fraction": 0.34, "robust.rule": "norm_bound", "robust.norm_bound": 0.5,
    },
    "dp_sgd_local": {
        "train.optimizer": "sgd", "train.lr": 0.1, "privacy.dp_sgd.enabled": True,
        "privacy.dp_sgd.noise_multiplier": 1.0, "privacy.dp_sgd.max_grad_norm": 1.0, "privacy.reproducible_noise": True,
    },
    "ditto": {"personalization.method": "ditto", "personalization.ditto_lambda": 0.1},
    "hetlora_deadline": {"devices.profiles": FLEET, "devices.deadline_s": 30},
    "fedbuff": {
        "devices.profiles": FLEET, "asynchronous.enabled": True, "asynchronous.buffer_size": 2,
        "asynchronous.concurrency": 3, "federation.rounds": 3,
    },
    "fedasync": {
        "devices.profiles": FLEET, "asynchronous.enabled": True, "asynchronous.method": "fedasync",
        "asynchronous.concurrency": 3, "federation.rounds": 3,
    },
    "continual_replay": {
        "continual.enabled": True, "continual.tasks": "[[sport,tech],[food,music]]",
        "continual.rounds_per_stage": 2, "continual.replay.enabled": True, "continual.replay.capacity": 8,
        "data.client_test_fraction": 0.0,
    },
    "workers2": {"workers": 2},
    "prompt_tuning": {"model.method": "prompt", "model.prompt.num_virtual_tokens": 4, "train.lr": 0.05},
}


def write_topic_csv(path: Path, n: int = 240, seed: int = 0) -> Path:
    rng = random.Random(seed)
    names = list(WORDS)
    rows = ["text,label"]
    for i in range(n):
        label = names[i % len(names)]
        words = rng.choices(WORDS[label], k=5) + rng.choices(SHARED, k=5)
        rng.shuffle(words)
        rows.append(f"{' '.join(words)},{label}")
    path.write_text("\n".join(rows) + "\n")
    return path


def overrides(name: str, tmp: Path) -> list[str]:
    data = write_topic_csv(tmp / "topics.csv")
    base = {
        "name": name,
        "model.name": "tiny-bert",
        "model.method": "lora",
        "model.lora.r": 4,
        "model.max_length": 16,
        "data.dataset": str(data),
        "federation.num_clients": 6,
        "federation.clients_per_round": 3,
        "federation.rounds": 2,
        "federation.partition.alpha": 1.0,
        "train.local_steps": 4,
        "train.batch_size": 8,
        "train.lr": 0.05,
        "eval.every": 1,
        "threads": 1,
        "workers": 1,
        "progress": False,
        "out": str(tmp / name),
    }
    base.update(SCENARIOS[name])
    return [f"{k}={v}" for k, v in base.items()]


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].contiguous()
        h.update(f"{k}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


TIMING = ("wall_s", "round_s", *MEASURED_KEYS)  # everything else a round records is locked
SUMMARY_KEYS = ("final_accuracy", "final_version", "bytes_up_total", "bytes_down_total", "rejected_updates",
                "malicious_clients")


def fingerprint(name: str, tmp: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Run scenario ``name`` in ``tmp``; return its record and its final state."""
    import fedfm

    summary = fedfm.run(None, overrides(name, tmp))
    out = tmp / name
    state = load_file(out / "final_state.safetensors")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rounds = [{k: v for k, v in r.items() if k not in TIMING} for r in records]
    return {
        "sha256": state_digest(state),
        "summary": {k: summary.get(k) for k in SUMMARY_KEYS},
        "rounds": rounds,
    }, state


def record(names) -> None:
    import tempfile

    GOLDEN.mkdir(exist_ok=True)
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            rec, state = fingerprint(name, Path(tmp))
        (GOLDEN / f"{name}.json").write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")
        save_file({k: v.contiguous() for k, v in state.items()}, GOLDEN / f"{name}.safetensors")
        print(name, rec["sha256"][:16], rec["summary"]["final_accuracy"], flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] != ["--record"]:
        sys.exit("usage: python tests/golden.py --record [NAME ...]")
    record(sys.argv[2:] or list(SCENARIOS))
