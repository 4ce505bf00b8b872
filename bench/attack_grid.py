"""Attack × defense grid: every attack against every robust aggregation rule on the default job.

Each cell is one ordinary fedfm run (a ``python -m fedfm run`` subprocess) of
the default job (``examples/default.yaml``: MiniLM + LoRA on BBC News, 20
clients under Dirichlet(0.5) label skew, 5 per round, 15 rounds) with 20% of
the clients malicious (4 of 20, the same clients all run; a random cohort of 5
holds one on average), and writes to ``--out``:

* ``grid.md``   — the table (rows: attack, columns: defense; a cell is the
  final test accuracy, plus the backdoor success rate ``bd`` in the ``none``
  and ``backdoor`` rows) and the headline;
* ``grid.json`` / ``grid.csv`` — every number, the settings and the overrides of each run;
* ``runs/<attack>__<defense>/`` — each run's own folder (metrics.jsonl,
  summary.json, ...), ``logs/`` — each run's console output.

A cell whose run folder already holds a summary of the same config is reused
(so an interrupted grid resumes); ``--force`` reruns everything.

Attacks (``attack.fraction=0.2``; the backdoor trigger and target are
``attack.trigger=cf``, ``attack.target_label=0`` and every run reports the
backdoor success rate, so the clean and defended rows have their baseline):

=========== =====================================================================
none        no attacker
sign_flip   the honest delta flipped and scaled by 4 (``attack.scale=4``)
gaussian    the delta replaced by N(0, 1) noise (``attack.sigma=1``)
label_flip  trains on labels y → C − 1 − y
backdoor    Bagdasaryan et al.: half its rows get the trigger and label 0, delta boosted by γ = n/η = 5
alie        "A Little Is Enough": μ − z·σ of the round's honest deltas (z from the paper)
ipm         inner product manipulation: −ε · mean of the honest deltas (ε = 0.1)
=========== =====================================================================

Defenses, set for a cohort of 5 with about one attacker per round:

============ ====================================================================
mean         plain FedAvg (the weighted mean; no defense)
median       coordinate-wise median
trimmed_mean β = 0.2: one update trimmed per side and coordinate
krum         f = 1 (needs n > 2f + 2 = 4)
multi_krum   f = 1, the mean of the m = n − f = 4 best-scored updates
norm_bound   every update clipped to L2 norm M, M = the median L2 norm of the 5
             honest updates of round 1 of the clean job (same cohort, seeds and
             initial model), measured here before the grid runs; ``--norm-bound``
             sets M instead
fltrust      100 root examples carved out of the global holdout (so this
             column's test set is the holdout minus those 100)
bulyan       not in the default grid: it needs n ≥ 4f + 3 = 7 clients per
             round; ``--defenses ...,bulyan`` runs it with a cohort of 7 (f = 1)
============ ====================================================================

    python bench/attack_grid.py --out runs/attack_grid --jobs 4            # the full 7 × 7 grid
    python bench/attack_grid.py --out /tmp/g --attacks none,backdoor --defenses mean,fltrust \\
        --set model.name=tiny-bert federation.rounds=2 train.local_steps=1  # a smoke run

``--set`` overrides go to every run (attack-specific keys only affect their
attack, e.g. ``--set attack.epsilon=1`` changes IPM only); ``--device`` is
passed through as ``device=`` when this fedfm has that config key. With
``--jobs N`` each run gets ``threads=cores/N`` unless ``--set threads=...``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from sweep import run_one  # noqa: E402  (sets up sys.path and the offline environment)

from fedfm.config import load_config  # noqa: E402
from fedfm.config.schema import RunConfig  # noqa: E402

# The grid measures the aggregation rules themselves, as the published tables do: the server's
# default update validation (norm bounds, on in every normal run) is turned off here.
COMMON = ["attack.fraction=0.2", "attack.target_label=0", "attack.trigger=cf", "eval.backdoor=true",
          "validation.max_norm_factor=null", "validation.warmup_factor=null"]
ATTACKS = {
    "none": ["attack.name=none"],
    "sign_flip": ["attack.name=sign_flip", "attack.scale=4"],
    "gaussian": ["attack.name=gaussian", "attack.sigma=1"],
    "label_flip": ["attack.name=label_flip", "attack.flip_mode=reverse"],
    "backdoor": ["attack.name=backdoor", "attack.poison_fraction=0.5"],  # scale unset: γ = n / η
    "alie": ["attack.name=alie"],
    "ipm": ["attack.name=ipm", "attack.epsilon=0.1"],
}
DEFENSES = {
    "mean": ["robust.rule=mean"],
    "median": ["robust.rule=median"],
    "trimmed_mean": ["robust.rule=trimmed_mean", "robust.trim_fraction=0.2"],
    "krum": ["robust.rule=krum", "robust.num_byzantine=1"],
    "multi_krum": ["robust.rule=multi_krum", "robust.num_byzantine=1"],
    "norm_bound": ["robust.rule=norm_bound"],  # robust.norm_bound: calibrated, see calibrate_norm_bound
    "fltrust": ["robust.rule=fltrust", "robust.root_examples=100"],
    "bulyan": ["robust.rule=bulyan", "robust.num_byzantine=1", "federation.clients_per_round=7"],
}
DEFAULT_DEFENSES = [d for d in DEFENSES if d != "bulyan"]
BACKDOOR_ROWS = ("none", "backdoor")  # rows whose cells also show the backdoor success rate


def calibrate_norm_bound(config: str | None, overrides: list[str]) -> dict:
    """The median L2 norm of the honest updates of round 1 of the clean job.

    Replays round 1 exactly as the runner would (same clients, cohort, seeds
    and initial model, FedAvg, no attacker) and measures every update's norm.
    """
    import numpy as np
    import torch

    from fedfm.algorithms.registry import build_algorithm
    from fedfm.data.encode import encode
    from fedfm.data.sources import load_text_dataset
    from fedfm.models import build_model
    from fedfm.models.state import get_state
    from fedfm.build import build_clients, seed_everything
    from fedfm.client.trainer import LocalTrainer
    from fedfm.drivers.simulation import sample_cohort

    cfg = load_config(config, overrides + ["attack.name=none", "robust.rule=mean"])
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    ds = load_text_dataset(cfg.data, cfg.model.task, seed=cfg.seed)
    _, clients, _ = build_clients(cfg, ds)
    num_labels = len(ds.label_names) if cfg.model.task == "seq_cls" else None
    kw = {}
    if "device" in RunConfig.model_fields:  # GPU support, where this fedfm has it
        from fedfm.models import resolve_device

        kw["device"] = resolve_device(cfg.device)
    fm = build_model(cfg.model, num_labels, seed=cfg.seed, **kw)
    enc = encode(ds.texts, fm.tokenizer, cfg.model.max_length, ds.labels if cfg.model.task == "seq_cls" else None)
    trainer = LocalTrainer(fm, enc, cfg.train, seed=cfg.seed)
    algo = build_algorithm(cfg.algorithm, num_clients=len(clients))
    state = get_state(fm.params)
    algo.start(state, 0)
    cohort = sample_cohort(len(clients), cfg.federation.clients_per_round, cfg.seed, 1)
    norms = []
    for cid in cohort:
        delta = trainer.local_update(algo, algo.broadcast(state, 0), clients[cid], 1).delta
        norms.append(float(torch.sqrt(sum((t.double() ** 2).sum() for t in delta.values() if t.is_floating_point()))))
    return {"norm_bound": float(np.median(norms)), "honest_norms": norms, "cohort": cohort,
            "how": "median L2 norm of the honest round-1 updates of the clean job"}


def _result(s: dict) -> dict:
    return {
        "accuracy": s.get("final_accuracy"),
        "backdoor_success_rate": s.get("backdoor_success_rate"),
        "rounds": s.get("rounds"),
        "malicious_clients": s.get("malicious_clients"),
        "rejected_updates": s.get("rejected_updates"),
        "wall_s": s.get("wall_s"),
        "device": s.get("device_name") or s.get("device"),
    }


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not math.isnan(x)


def cell(r: dict | None, attack: str) -> str:
    if r is None:
        return ""
    if r["status"] == "error":
        return "error"
    text = f"{r['accuracy']:.3f}" if _num(r.get("accuracy")) else "–"
    if attack in BACKDOOR_ROWS and _num(r.get("backdoor_success_rate")):
        text += f" · bd {r['backdoor_success_rate']:.3f}"
    return text


def table(results: dict, attacks: list[str], defenses: list[str]) -> str:
    head = "| attack \\ defense | " + " | ".join(defenses) + " |"
    rows = [head, "|" + "---|" * (len(defenses) + 1)]
    for a in attacks:
        rows.append(f"| {a} | " + " | ".join(cell(results.get((a, d)), a) for d in defenses) + " |")
    return "\n".join(rows)


def headline(results: dict, attacks: list[str], defenses: list[str]) -> list[str]:
    ok = {k: r for k, r in results.items() if r["status"] != "error" and _num(r.get("accuracy"))}
    clean = ok.get(("none", "mean"))
    lines = []
    if clean:
        lines.append(f"clean accuracy (no attack, FedAvg): {clean['accuracy']:.3f}")
    for a in attacks:
        if a == "none":
            continue
        row = {d: ok[(a, d)] for d in defenses if (a, d) in ok}
        if not row:
            continue
        best = max(row, key=lambda d: row[d]["accuracy"])
        text = f"under {a}: best defense {best} {row[best]['accuracy']:.3f}"
        if clean:
            text += f" ({row[best]['accuracy'] - clean['accuracy']:+.3f} vs clean)"
        if "mean" in row and best != "mean":
            text += f"; FedAvg {row['mean']['accuracy']:.3f}"
        if a == "backdoor":
            bd = {d: r for d, r in row.items() if _num(r.get("backdoor_success_rate"))}
            if bd:
                low = min(bd, key=lambda d: bd[d]["backdoor_success_rate"])
                text += f"; lowest backdoor success {low} {bd[low]['backdoor_success_rate']:.3f}"
                if "mean" in bd:
                    text += f" (FedAvg {bd['mean']['backdoor_success_rate']:.3f})"
        lines.append(text)
    return lines


def _split(arg: str, known: dict) -> list[str]:
    names = [x.strip() for x in arg.split(",") if x.strip()]
    bad = [x for x in names if x not in known]
    if bad:
        raise SystemExit(f"error: unknown {', '.join(bad)}; choose from {', '.join(known)}")
    return names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/attack_grid", help="output folder (default runs/attack_grid)")
    ap.add_argument("--config", default=None, help="base job YAML (default: fedfm's default job)")
    ap.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated subset of: " + ", ".join(ATTACKS))
    ap.add_argument("--defenses", default=",".join(DEFAULT_DEFENSES),
                    help="comma-separated subset of: " + ", ".join(DEFENSES))
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides applied to every run")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel (subprocesses)")
    ap.add_argument("--device", default=None, help="passed as device=... (when fedfm has that key)")
    ap.add_argument("--norm-bound", type=float, default=None, help="M for norm_bound instead of calibrating it")
    ap.add_argument("--force", action="store_true", help="rerun cells that already have a finished run")
    args = ap.parse_args(argv)

    attacks, defenses = _split(args.attacks, ATTACKS), _split(args.defenses, DEFENSES)
    out = Path(args.out).resolve()
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    base = list(args.set)
    if args.device:
        if "device" not in RunConfig.model_fields:
            raise SystemExit("error: --device given, but this fedfm has no 'device' config key")
        base.append(f"device={args.device}")
    jobs = max(1, args.jobs)
    if not any(s.startswith("threads=") for s in base):
        base.append(f"threads={max(1, (os.cpu_count() or 1) // jobs)}")
    config = str(Path(args.config).resolve()) if args.config else None
    load_config(config, base)  # a bad --set fails here, once, not in every run

    calibration = None
    if "norm_bound" in defenses:
        if args.norm_bound is not None:
            calibration = {"norm_bound": args.norm_bound, "how": "--norm-bound"}
        else:
            print("calibrating norm_bound: round 1 of the clean job ...", flush=True)
            calibration = calibrate_norm_bound(config, base)
            print(f"  honest update norms {['%.4g' % n for n in calibration['honest_norms']]}"
                  f" -> M = {calibration['norm_bound']:.4g}", flush=True)
        DEFENSES["norm_bound"] = ["robust.rule=norm_bound", f"robust.norm_bound={calibration['norm_bound']!r}"]

    cells = [(a, d) for a in attacks for d in defenses]
    overrides = {k: base + COMMON + ATTACKS[k[0]] + DEFENSES[k[1]] + [f"name=grid-{k[0]}-{k[1]}"] for k in cells}
    results: dict = {}
    t0 = time.perf_counter()
    print(f"{len(cells)} runs, {jobs} at a time -> {out}", flush=True)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {
            pool.submit(run_one, config, overrides[(a, d)], out / "runs" / f"{a}__{d}",
                        out / "logs" / f"{a}__{d}.log", args.force, _result): (a, d)
            for a, d in cells
        }
        for fut in as_completed(futures):
            a, d = futures[fut]
            r = fut.result()
            results[(a, d)] = r
            msg = r.get("error") if r["status"] == "error" else cell(r, "backdoor")
            print(f"  [{len(results)}/{len(cells)}] {a:>10} × {d:<12} {r['status']:>6}  {msg}"
                  f"  ({r.get('wall_s') or 0:.0f} s)", flush=True)

    md_table, head = table(results, attacks, defenses), headline(results, attacks, defenses)
    cfg = load_config(config, base)
    devices = sorted({str(r.get("device")) for r in results.values() if r.get("device")})
    notes = [
        f"Job: {config or 'the default job (examples/default.yaml)'}; overrides for every run: {' '.join(base) or 'none'}; "
        f"model {cfg.model.name} ({cfg.model.method}), {cfg.federation.num_clients} clients, "
        f"{cfg.federation.clients_per_round} per round, {cfg.federation.rounds} rounds; device: {', '.join(devices) or '?'}.",
        "Cells: final global test accuracy; `bd` = backdoor success rate (share of non-target test examples "
        "classified as the target class 0 once the trigger `cf` is inserted).",
        "20% of the clients are malicious (the same ones in every run); each round's cohort is random, "
        "so a round holds 0 to 4 of them (1 on average).",
    ]
    if calibration:
        notes.append(f"norm_bound: M = {calibration['norm_bound']:.4g} ({calibration['how']}).")
    if "fltrust" in defenses:
        notes.append("fltrust: the server's 100 root examples come out of the global holdout, "
                     "so that column is tested on the holdout minus those 100 examples.")
    if "bulyan" in defenses:
        notes.append("bulyan: run with 7 clients per round (it needs n >= 4f + 3 = 7 for f = 1).")
    else:
        notes.append("bulyan is not in the grid: it needs n >= 4f + 3 = 7 clients per round "
                     "(the job has 5); add it with --defenses ...,bulyan (cohort of 7).")
    md = "\n\n".join([
        "# Attack × defense grid",
        md_table,
        "\n".join(f"- {x}" for x in notes),
        "## Headline\n\n" + "\n".join(f"- {x}" for x in head),
        f"(`python bench/attack_grid.py`, {len(cells)} runs, {time.perf_counter() - t0:.0f} s wall)",
    ]) + "\n"
    (out / "grid.md").write_text(md)
    rows = [{"attack": a, "defense": d, **results[(a, d)], "overrides": overrides[(a, d)],
             "run_dir": str(out / "runs" / f"{a}__{d}")} for a, d in cells]
    (out / "grid.json").write_text(json.dumps(
        {"config": config, "overrides": base, "attacks": attacks, "defenses": defenses,
         "norm_bound_calibration": calibration, "headline": head, "results": rows}, indent=2, default=str) + "\n")
    fields = ["attack", "defense", "status", "accuracy", "backdoor_success_rate", "rounds", "rejected_updates",
              "wall_s", "device", "run_dir", "error"]
    with open(out / "grid.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    print("\n" + md_table + "\n")
    for x in head:
        print(x)
    print(f"\nwrote {out / 'grid.md'}, grid.json, grid.csv")
    return 1 if any(r["status"] == "error" for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
