"""Personalization on a Dirichlet(0.1) split of BBC News: does every client get a better model?

The default job (all-MiniLM-L6-v2 + LoRA, BBC News topics) with a strong
label skew (Dirichlet alpha = 0.1), run five ways with the same seed, split,
cohorts and local step budget:

* ``fedavg``: the global model, scored on each client's local test split;
* ``local``: every client trains alone on its own data (nothing aggregated);
* ``fedper``: shared body, personal head (Arivazhagan et al. 2019);
* ``fedrep``: personal head trained first with the body frozen, then the body
  with the head frozen (Collins et al. 2021);
* ``ditto``: the global model plus a private model pulled toward it
  (Li et al. 2021).

The table reports the mean over clients of the personalized model's accuracy
on its own local test split (for ``fedavg`` the personalized model *is* the
global model), its worst-10% and spread, the global model's mean client
accuracy and global test accuracy, and the bytes each run sent up.
The goal: mean personalized accuracy above both ``fedavg`` and ``local``.

Usage::

    python bench/personalize.py --out runs/bench-personalize --threads 1
    python bench/personalize.py --methods fedavg fedrep --set federation.rounds=2   # smoke

Prints and writes ``OUT/personalize.md`` and ``OUT/personalize.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sweep import add_run_args, run_one

# The default job, on a Dirichlet(0.1) split, sized to finish in minutes on two busy CPU cores:
# 10 clients, 5 per round, 8 rounds (each client trains about 4 times, 8 local steps each).
SETTING = [
    "federation.partition.alpha=0.1",
    "federation.num_clients=10",
    "federation.clients_per_round=5",
    "federation.rounds=8",
    "eval.every=0",
]
METHODS = {
    "fedavg": [],
    "local": ["personalization.method=local"],
    "fedper": ["personalization.method=fedper"],
    "fedrep": ["personalization.method=fedrep", "personalization.head_steps=8"],
    "ditto": ["personalization.method=ditto", "personalization.ditto_lambda=0.1"],
}


def extract(summary: dict) -> dict:
    f = summary.get("final") or {}
    personal = "client_personal_accuracy" if "client_personal_accuracy_mean" in f else "client_accuracy"
    return {
        "personal_mean": f.get(f"{personal}_mean"),
        "personal_worst10": f.get(f"{personal}_worst10"),
        "personal_std": f.get(f"{personal}_std"),
        "global_client_mean": f.get("client_accuracy_mean"),
        "global_test": f.get("test_accuracy"),
        "bytes_up": summary.get("bytes_up_total"),
        "wall_s": summary.get("wall_s"),
    }


def fmt(v, pct=True) -> str:
    if v is None:
        return "n/a"
    return f"{100 * v:.1f}" if pct else f"{v / 1e6:.1f} MB"


def table(rows: dict) -> str:
    lines = [
        "| method | mean personalized acc (%) | worst 10% (%) | std (%) | global model: mean client acc (%) "
        "| global test acc (%) | bytes up | wall (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        if r.get("status") == "error":
            lines.append(f"| {name} | error: {r['error']} | | | | | | |")
            continue
        lines.append(
            f"| {name} | {fmt(r['personal_mean'])} | {fmt(r['personal_worst10'])} | {fmt(r['personal_std'])} "
            f"| {fmt(r['global_client_mean'])} | {fmt(r['global_test'])} | {fmt(r['bytes_up'], pct=False)} "
            f"| {r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def verdict(rows: dict) -> str:
    ok = {k: r for k, r in rows.items() if r.get("status") != "error"}
    if not {"fedavg", "local"} <= set(ok):
        return "goal not checked: the fedavg and local baselines are both needed"
    bar = max(ok["fedavg"]["personal_mean"], ok["local"]["personal_mean"])
    out = []
    for name in ("fedper", "fedrep", "ditto"):
        if name in ok:
            v = ok[name]["personal_mean"]
            out.append(f"{name}: {100 * v:.1f}% {'beats' if v > bar else 'does NOT beat'} "
                       f"max(fedavg, local) = {100 * bar:.1f}%")
    return "; ".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench-personalize")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    add_run_args(ap)
    args = ap.parse_args()
    out = Path(args.out)
    t0 = time.perf_counter()

    def job(name: str) -> tuple[str, dict]:
        over = SETTING + METHODS[name] + [f"seed={args.seed}", f"threads={args.threads}", f"name=personalize-{name}"]
        over += args.set
        run_dir = out / name
        res = run_one(None, over, run_dir, out / "logs" / f"{name}.log", force=args.force, extract=extract)
        print(f"  {name}: {res.get('status')} {res.get('personal_mean', res.get('error'))}", flush=True)
        return name, res

    with ThreadPoolExecutor(args.jobs) as pool:
        rows = dict(pool.map(job, args.methods))
    text = table(rows)
    check = verdict(rows)
    header = (f"Dirichlet(0.1) BBC News, MiniLM + LoRA, seed {args.seed}; overrides: "
              f"{' '.join(SETTING + args.set)}")
    print("\n" + header + "\n\n" + text + "\n\n" + check)
    out.mkdir(parents=True, exist_ok=True)
    (out / "personalize.md").write_text(header + "\n\n" + text + "\n\n" + check + "\n")
    (out / "personalize.json").write_text(json.dumps(
        {"setting": SETTING + args.set, "seed": args.seed, "rows": rows, "verdict": check,
         "bench_wall_s": time.perf_counter() - t0}, indent=2))


if __name__ == "__main__":
    main()
