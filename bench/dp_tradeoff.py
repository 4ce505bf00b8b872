"""Accuracy against the privacy budget epsilon, cross-silo and cross-device.

Three settings, each at epsilon in {1, 4, 8, inf} (inf = no DP at all):

* ``cross-silo``: sample-level DP-SGD on every client (``privacy.dp_sgd``,
  Abadi et al. 2016) on the 20-client default job, every silo in every round;
  each client's own accountant and sigma_i, the table shows the largest
  epsilon over clients.
* ``cross-silo-secagg``: the same silos under secure aggregation with
  distributed noise (``privacy.dp_sgd.noise=distributed``): each silo adds
  sigma / sqrt(t) and the server sees only the sum, so each round is one step
  of central DP-SGD on the union of the silos' data (one local step, one
  sampling rate for all); one sigma for every silo.
* ``cross-device``: client-level DP (DP-FedAvg, McMahan et al. 2018,
  ``privacy.client_dp``) over a population of 1,000 small clients (BBC News
  split IID, about 1.8 training articles each), 300 per round for 40 rounds, server
  momentum (DP-FedAvgM) and a released EMA of the global versions (De et al.
  2022). Client-level DP needs a large population: the noise on the mean
  update shrinks with the cohort size.

All fine-tune LoRA r = 1 with mean pooling (see the recipes below); the
epsilon = inf run of each seed is the same recipe without DP.

delta is at most 1/N in all (N = a client's examples for sample-level DP,
the number of clients for client-level DP). The noise multiplier is calibrated
by fedfm from ``target_epsilon`` and the planned rounds.

Usage::

    python bench/dp_tradeoff.py --out runs/bench-dp --jobs 4 --threads 4
    python bench/dp_tradeoff.py --setting cross-silo-secagg --epsilons 8 inf --seeds 0 1 2 --jobs 2
    python bench/dp_tradeoff.py --setting cross-device --epsilons 8 inf --seeds 0 1 2 --jobs 6 --set device=cuda
    python bench/dp_tradeoff.py --setting cross-device --epsilons 8 inf --set federation.rounds=2   # smoke

Prints and writes ``OUT/dp_tradeoff.md`` and ``OUT/dp_tradeoff.json``.
"""

from __future__ import annotations

import argparse
import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from sweep import add_run_args, run_one


@dataclass
class Job:
    name: str
    overrides: list[str]
    meta: dict = field(default_factory=dict)


def final_metric(summary: dict, key: str) -> float | None:
    value = (summary.get("final") or {}).get(key)
    return float(value) if value is not None else None

# Recipes: what makes DP cost little here is a small trainable state that learns fast. Both use the
# mean of the real tokens (``model.pooling=mean``, how all-MiniLM-L6-v2 was trained to embed text)
# instead of BERT's pooler, and LoRA r = 1 on one query projection: with the head, 2,693 trainable
# coordinates (the Gaussian noise's norm grows with their square root).
SMALL_STATE = [
    "model.pooling=mean",
    "model.lora.r=1",
    "model.lora.alpha=2",
    "model.lora.target_modules=[encoder.layer.5.attention.self.query]",
]
CROSS_SILO = SMALL_STATE + [  # the 20-client default job; every silo takes part in every round, as silos do
    "train.optimizer=sgd",
    "train.lr=0.5",
    "federation.clients_per_round=20",
]
CROSS_SILO_DP = ["privacy.dp_sgd.enabled=true", "privacy.dp_sgd.max_grad_norm=1.0"]

# The same silos under secure aggregation with distributed noise (privacy.dp_sgd.noise=distributed): each
# silo adds sigma / sqrt(t) of the noise, t = 11 of 20 (a strict majority: 9 silos may drop out), so the
# server's sum holds at least sigma. One SGD step per round at one sampling rate q = 0.2 makes the aggregate
# central DP-SGD on the union of the silos (expected batch ~285), 120 rounds = 120 steps.
CROSS_SILO_SECAGG = SMALL_STATE + [
    "name=cross-silo-secagg",
    "train.optimizer=sgd",
    "train.lr=1.0",
    "train.local_steps=1",
    "federation.clients_per_round=20",
    "federation.rounds=120",
    "privacy.secure_aggregation.enabled=true",
    "privacy.secure_aggregation.threshold=11",
    "eval.every=60",
]
CROSS_SILO_SECAGG_DP = CROSS_SILO_DP + ["privacy.dp_sgd.noise=distributed", "privacy.dp_sgd.sampling_rate=0.2"]

CROSS_DEVICE = [
    "name=cross-device",
    "federation.num_clients=1000",
    "federation.clients_per_round=300",
    "federation.rounds=40",
    "federation.partition.scheme=iid",
    "federation.partition.min_examples=1",
    "data.client_test_fraction=0",
    *SMALL_STATE,
    "train.local_epochs=1",
    "train.batch_size=8",
    "train.lr=0.02",  # one AdamW step moves each coordinate by about lr: update norm ~ lr * sqrt(d) = 1.04
    "algorithm.name=fedavgm",
    "algorithm.server_lr=1.0",
    "algorithm.momentum=0.9",
    "algorithm.ema_decay=0.9",  # release an EMA of the global versions (post-processing, free under DP)
    "eval.every=10",
    "eval.clients=false",
]
CROSS_DEVICE_DP = [
    "privacy.client_dp.enabled=true",
    "privacy.client_dp.clip_norm=1.06",  # the AdamW step's norm: clips (almost) nothing
    "privacy.client_dp.delta=1e-4",
]


SETTINGS = {
    "cross-silo": (CROSS_SILO, CROSS_SILO_DP, "privacy.dp_sgd.target_epsilon"),
    "cross-silo-secagg": (CROSS_SILO_SECAGG, CROSS_SILO_SECAGG_DP, "privacy.dp_sgd.target_epsilon"),
    "cross-device": (CROSS_DEVICE, CROSS_DEVICE_DP, "privacy.client_dp.target_epsilon"),
}


def jobs_for(setting: str, epsilons: list[float], seed: int = 0) -> list[Job]:
    base, dp, key = SETTINGS[setting]
    out = []
    for eps in epsilons:
        tag = "inf" if math.isinf(eps) else f"{eps:g}"
        overrides = list(base) + ([] if math.isinf(eps) else dp + [f"{key}={eps}"]) + [f"seed={seed}"]
        out.append(Job(f"{setting}-s{seed}-eps{tag}", overrides,
                       meta={"setting": setting, "seed": seed, "target_epsilon": eps}))
    return out


def spent(summary: dict) -> tuple[float | None, float | None, float | None]:
    """(epsilon, delta, noise multiplier) actually spent, from either DP mechanism's summary."""
    p = summary.get("privacy") or {}
    if "dp_sgd" in p:
        s = p["dp_sgd"]
        return s.get("epsilon_max"), s.get("delta"), s.get("noise_multiplier")
    if "epsilon" in p:
        return p.get("epsilon"), p.get("delta"), p.get("noise_multiplier")
    return None, None, None


def table(results: dict[str, dict], jobs: list[Job]) -> tuple[str, list[dict]]:
    rows, lines = [], ["| setting | seed | target ε | ε spent | δ | σ | test accuracy | vs non-private | wall s |",
                       "|---|---|---|---|---|---|---|---|---|"]
    ref = {}  # (setting, seed) -> the non-private run's accuracy
    for job in jobs:
        if math.isinf(job.meta["target_epsilon"]):
            ref[job.meta["setting"], job.meta["seed"]] = final_metric(results[job.name], "test_accuracy")
    for job in jobs:
        s = results[job.name]
        acc = final_metric(s, "test_accuracy")
        eps, delta, sigma = spent(s)
        base = ref.get((job.meta["setting"], job.meta["seed"]))
        gap = None if acc is None or base is None else 100 * (acc - base)
        row = {"job": job.name, **job.meta, "epsilon": eps, "delta": delta, "noise_multiplier": sigma,
               "test_accuracy": acc, "gap_points": gap, "wall_s": s.get("wall_s"), "error": s.get("error")}
        rows.append(row)
        f = lambda v, fmt: "—" if v is None else format(v, fmt)  # noqa: E731
        lines.append(
            f"| {job.meta['setting']} | {job.meta['seed']} | {'∞' if math.isinf(job.meta['target_epsilon']) else f(job.meta['target_epsilon'], 'g')} "
            f"| {f(eps, '.3f')} | {f(delta, '.0e')} | {f(sigma, '.3f')} | "
            f"{s['error'] if s.get('error') else f(acc, '.3f')} | {f(gap, '+.1f')} | {f(s.get('wall_s'), '.0f')} |"
        )
    return "\n".join(lines), rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setting", nargs="+", choices=list(SETTINGS), default=["cross-silo", "cross-device"])
    ap.add_argument("--epsilons", nargs="+", type=float, default=[1, 4, 8, math.inf])
    ap.add_argument("--out", type=Path, default=Path("runs/bench-dp"))
    add_run_args(ap, seeds=True)
    args = ap.parse_args()
    jobs = [j for s in args.setting for seed in args.seeds for j in jobs_for(s, args.epsilons, seed)]
    # parallelism comes from --jobs; one process per run (no fedfm workers), so --threads means what it says
    extra = ["workers=1", f"threads={args.threads}", *args.set]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {j.name: pool.submit(run_one, None, j.overrides + extra, args.out / j.name, args.out / f"{j.name}.log", args.force)
                   for j in jobs}
        results = {}
        for j in jobs:
            results[j.name] = futures[j.name].result()
            print(f"[dp] {j.name}: {results[j.name]['status']} {results[j.name].get('error', '')}", flush=True)
    md, rows = table(results, jobs)
    (args.out / "dp_tradeoff.md").write_text(md + "\n")
    (args.out / "dp_tradeoff.json").write_text(json.dumps(rows, indent=2))
    print(md)


if __name__ == "__main__":
    main()
