"""Federated continual learning: naive sequential training against each mitigation, on one stream.

The stream is ``examples/continual.yaml``'s: BBC News topics arriving in three
stages (business; entertainment + politics; sports + tech), LoRA on
all-MiniLM-L6-v2, Dirichlet(1.0) over the clients, the always-on loop of
``fedfm.continual``. Every job differs from ``naive`` in one mitigation only:

* ``naive``: each stage trains on its new data only;
* ``replay``: + a local reservoir buffer of ``--capacity`` examples per client;
* ``l2``: + ``(lambda/2)||theta - theta_prev||^2`` toward the previous stage's global model;
* ``ewc``: + EWC (Kirkpatrick et al. 2017) with each client's own diagonal Fisher;
* ``per_task``: one LoRA state (and head) per task, the task id picks it at test
  time; a new task starts from the previous task's final state.

Table: final average accuracy over the three tasks, forgetting (Chaudhry et al.
2018; lower is better), backward transfer (Lopez-Paz & Ranzato 2017; negative =
forgotten), final-task accuracy, wall time. Goal: one mitigation cuts
forgetting at least in half at less than 2 points of final-task accuracy
(against naive).

Usage::

    python bench/continual.py --out runs/bench-continual            # the measured run (one thread per job)
    python bench/continual.py --only naive replay --set continual.rounds_per_stage=1   # smoke

Prints and writes ``OUT/continual.md`` and ``OUT/continual.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sweep import ROOT, run_one

CONFIG = str(ROOT / "examples" / "continual.yaml")
# Smaller than the example so that five jobs fit in ~15 minutes of a shared 2-core machine.
BASE = [
    "threads=1",
    "model.max_length=32",
    "federation.num_clients=8",
    "federation.clients_per_round=4",
    "train.local_steps=6",
    "continual.rounds_per_stage=4",
    "continual.replay.enabled=false",
]


def jobs(capacity: int, l2: float, ewc: float) -> dict[str, list[str]]:
    return {
        "naive": [],
        "replay": ["continual.replay.enabled=true", f"continual.replay.capacity={capacity}"],
        "l2": ["continual.regularizer.name=l2", f"continual.regularizer.strength={l2}"],
        "ewc": ["continual.regularizer.name=ewc", f"continual.regularizer.strength={ewc}",
                "continual.regularizer.fisher_examples=32"],
        "per_task": ["continual.per_task_adapters=true", "continual.adapter_init=previous"],
    }


def extract(s: dict) -> dict:
    return {
        "average_accuracy": s["average_accuracy"],
        "forgetting": s["forgetting"],
        "backward_transfer": s["backward_transfer"],
        "final_task_accuracy": s["final_task_accuracy"],
        "accuracy_matrix": s["continual"]["accuracy_matrix"],
        "bytes_down_total": s["bytes_down_total"],
        "wall_s": s["wall_s"],
    }


def table(rows: dict[str, dict]) -> str:
    naive = rows.get("naive", {})
    lines = [
        "| method | avg accuracy | forgetting | BWT | final-task accuracy | forgetting vs naive | final-task vs naive | goal | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        if r.get("status") == "error":
            lines.append(f"| {name} | error: {r['error']} | | | | | | | |")
            continue
        ratio = delta = goal = ""
        if name != "naive" and naive.get("forgetting"):
            ratio_v = r["forgetting"] / naive["forgetting"]
            delta_v = 100 * (r["final_task_accuracy"] - naive["final_task_accuracy"])
            ratio, delta = f"{ratio_v:.2f}x", f"{delta_v:+.1f} pt"
            goal = "met" if ratio_v <= 0.5 and delta_v > -2.0 else "not met"
        lines.append(
            f"| {name} | {r['average_accuracy']:.3f} | {r['forgetting']:.3f} | {r['backward_transfer']:+.3f} | "
            f"{r['final_task_accuracy']:.3f} | {ratio} | {delta} | {goal} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench-continual")
    ap.add_argument("--only", nargs="*", help="run only these jobs")
    ap.add_argument("--capacity", type=int, default=48, help="replay buffer per client (examples)")
    ap.add_argument("--l2", type=float, default=10.0, help="L2 strength lambda")
    ap.add_argument("--ewc", type=float, default=1000.0, help="EWC strength lambda")
    ap.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for every job")
    ap.add_argument("--force", action="store_true", help="rerun finished jobs")
    args = ap.parse_args()
    out = Path(args.out)
    rows = {}
    for name, extra in jobs(args.capacity, args.l2, args.ewc).items():
        if args.only and name not in args.only:
            continue
        overrides = BASE + extra + list(args.set) + [f"name=continual-{name}"]
        rows[name] = run_one(CONFIG, overrides, out / name, out / "logs" / f"{name}.log", args.force, extract)
        r = rows[name]
        print(f"{name}: " + (r.get("error", "") if r["status"] == "error" else
                             f"avg {r['average_accuracy']:.3f} forgetting {r['forgetting']:.3f} "
                             f"final-task {r['final_task_accuracy']:.3f} ({r['status']}, {r['wall_s']:.0f} s)"), flush=True)
    text = table(rows)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "continual.md").write_text(
        "# bench/continual.py\n\n" + f"overrides on examples/continual.yaml: `{' '.join(BASE + list(args.set))}`\n\n" + text + "\n"
    )
    (out / "continual.json").write_text(json.dumps({"base": BASE + list(args.set), "rows": rows}, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
