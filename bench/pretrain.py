"""Federated pre-training at equal total tokens: centralized vs DiLoCo vs FedAvg vs sync-every-step.

Every arm trains the same from-scratch Llama-style decoder (``examples/pretrain.yaml``:
4 layers, hidden 128, byte-level tokenizer) on the same Shakespeare training pool
for the same number of optimizer steps on the same batch size, so every arm sees
the same number of training sequences (tokens up to padding); all are scored on
the same held-out speeches. With K clients per round, H local steps and R rounds
(``T = R·K·H`` steps in all):

* ``centralized``: one client holds all the data and takes T steps in one round
  (one AdamW run, nothing exchanged but the initial and final model);
* ``diloco``: K clients (whole speaking roles each), H inner AdamW steps, server
  Nesterov momentum on the averaged pseudo-gradient (Douillard et al. 2023),
  R rounds, outer lr 0.7 and momentum 0.5 (``--outer-lr``, ``--outer-momentum``):
  with a handful of outer steps the paper's momentum 0.9, tuned for hundreds of
  them, overshoots;
* ``diloco-paper``: the same with the paper's outer lr 0.7 and momentum 0.9;
* ``fedavg``: the same rounds with plain averaging (server lr 1);
* ``sync-fedavg``: synchronizing every step, FedAvg with 1 local step per
  round and ``T/K`` rounds. fedfm clients are stateless, so each step is
  AdamW's first step from a fresh state;
* ``sync-adam``: synchronizing every step with the optimizer state kept on the
  server, i.e. data-parallel Adam: clients take one plain SGD step with lr 1
  (their delta is minus their gradient) and the server applies FedAdam
  (Reddi et al. 2021) with the inner lr, ``T/K`` rounds.

Both sync arms exchange the same bytes (the whole model, both ways, every
step); the bytes ratio is ``bytes(sync) / bytes(arm)``, which equals H for
diloco and fedavg.

Goal (issue 4): DiLoCo within 5% of centralized perplexity with at least 50x
fewer bytes than synchronizing every step.

Usage::

    python bench/pretrain.py                      # the measured table (about 15 min on 2 busy cores)
    python bench/pretrain.py --steps-per-round 4 --rounds 2 --out runs/bench-pretrain-smoke   # smoke

Prints and writes ``OUT/pretrain.md`` and ``OUT/pretrain.json``. Finished runs
whose config is unchanged are reused (``--force`` reruns them).
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sweep import ROOT, run_one

CONFIG = str(ROOT / "examples" / "pretrain.yaml")
ARMS = ("centralized", "diloco", "diloco-paper", "fedavg", "sync-fedavg", "sync-adam")
PAPER = (0.7, 0.9)  # DiLoCo's outer lr and Nesterov momentum (Douillard et al. 2023)


def arm_overrides(arm: str, clients: int, local_steps: int, rounds: int, lr: float,
                  outer_lr: float = 0.7, outer_momentum: float = 0.9) -> list[str]:
    """The ``key=value`` overrides of one arm (on top of examples/pretrain.yaml)."""
    total = rounds * clients * local_steps
    fed = [f"federation.num_clients={clients}", f"federation.clients_per_round={clients}",
           "federation.partition.scheme=natural"]
    fedavg = ["algorithm.name=fedavg", "algorithm.server_lr=1.0"]  # the example's outer lr must not leak in
    if arm == "centralized":
        return ["federation.num_clients=1", "federation.clients_per_round=1", "federation.rounds=1",
                "federation.partition.scheme=iid", f"train.local_steps={total}", *fedavg]
    if arm in ("diloco", "diloco-paper"):
        lr_out, mom = PAPER if arm == "diloco-paper" else (outer_lr, outer_momentum)
        return fed + [f"federation.rounds={rounds}", f"train.local_steps={local_steps}",
                      "algorithm.name=diloco", f"algorithm.server_lr={lr_out}", f"algorithm.momentum={mom}"]
    if arm == "fedavg":
        return fed + [f"federation.rounds={rounds}", f"train.local_steps={local_steps}", *fedavg]
    if arm == "sync-fedavg":
        return fed + [f"federation.rounds={total // clients}", "train.local_steps=1", *fedavg]
    if arm == "sync-adam":
        return fed + [f"federation.rounds={total // clients}", "train.local_steps=1", "train.optimizer=sgd",
                      "train.lr=1.0", "algorithm.name=fedadam", f"algorithm.server_lr={lr}",
                      "algorithm.beta1=0.9", "algorithm.beta2=0.99", "algorithm.tau=1e-8"]
    raise ValueError(f"unknown arm {arm!r}")


def extract(summary: dict) -> dict:
    return {
        "perplexity": summary.get("final_perplexity"),
        "bytes": summary["bytes_up_total"] + summary["bytes_down_total"],
        "rounds": summary["rounds"],
        "state_bytes": summary["trainable_state_bytes"],
        "params": summary["trainable_params"],
        "wall_s": summary["wall_s"],
    }


def table(results: dict[str, dict], plan: dict[str, tuple[int, int, int]], batch: int) -> tuple[str, list[dict]]:
    """The markdown table and its rows; ``plan[arm] = (rounds, clients, local steps)``."""
    central = results.get("centralized", {}).get("perplexity")
    sync = next((results[a]["bytes"] for a in ("sync-fedavg", "sync-adam") if results.get(a, {}).get("bytes")), None)
    lines = [
        "| arm | rounds x clients x local steps | sequences | final val. perplexity | ratio to centralized "
        "| total bytes | sync bytes / bytes | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = []
    for arm, r in results.items():
        shape = " x ".join(str(v) for v in plan[arm])
        if r.get("status") == "error":
            lines.append(f"| {arm} | {shape} | | error: {r['error']} | | | | |")
            rows.append({"arm": arm, **r})
            continue
        ppl, nbytes = r["perplexity"], r["bytes"]
        ratio = ppl / central if central and ppl else None
        saving = sync / nbytes if sync and nbytes else None
        sequences = plan[arm][0] * plan[arm][1] * plan[arm][2] * batch
        rows.append({"arm": arm, "rounds_clients_steps": plan[arm], "sequences": sequences, **r,
                     "ratio_to_centralized": ratio, "bytes_saving_vs_sync": saving})
        lines.append(
            f"| {arm} | {shape} | {sequences:,} | {ppl:.3f} | {'' if ratio is None else f'{ratio:.3f}'} "
            f"| {nbytes / 1e6:,.1f} MB | {'' if saving is None else f'{saving:,.1f}x'} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines), rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/bench-pretrain"))
    ap.add_argument("--clients", type=int, default=2, help="K: clients per round (= all clients)")
    ap.add_argument("--steps-per-round", type=int, default=64, help="H: local steps per round (diloco, fedavg)")
    ap.add_argument("--rounds", type=int, default=6, help="R: rounds of diloco and fedavg")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3, help="inner AdamW lr (the server Adam lr of sync-adam)")
    ap.add_argument("--outer-lr", type=float, default=0.7, help="diloco: server (outer) lr")
    ap.add_argument("--outer-momentum", type=float, default=0.5,
                    help="diloco: Nesterov momentum (diloco-paper always uses 0.9)")
    ap.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--force", action="store_true", help="rerun finished runs")
    ap.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for every arm")
    args = ap.parse_args()

    common = ["data.client_test_fraction=0", "eval.every=0", "eval.clients=false", f"train.lr={args.lr}",
              f"train.batch_size={args.batch_size}",
              f"threads={args.threads}", *args.set]
    k, h, r = args.clients, args.steps_per_round, args.rounds
    plan = {"centralized": (1, 1, r * k * h), "diloco": (r, k, h), "diloco-paper": (r, k, h), "fedavg": (r, k, h),
            "sync-fedavg": (r * h, k, 1), "sync-adam": (r * h, k, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {
            arm: pool.submit(run_one, CONFIG, common + arm_overrides(arm, k, h, r, args.lr, args.outer_lr, args.outer_momentum), args.out / arm,
                             args.out / f"{arm}.log", args.force, extract)
            for arm in args.arms
        }
        results = {arm: f.result() for arm, f in futures.items()}
    md, rows = table(results, plan, args.batch_size)
    print(md)
    diloco = next((x for x in rows if x["arm"] == "diloco" and x.get("ratio_to_centralized")), None)
    if diloco is not None and diloco.get("bytes_saving_vs_sync"):
        ok_ppl = diloco["ratio_to_centralized"] <= 1.05
        ok_bytes = diloco["bytes_saving_vs_sync"] >= 50
        verdict = (f"\nGoal (DiLoCo within 5% of centralized perplexity, >= 50x fewer bytes than sync): "
                   f"perplexity ratio {diloco['ratio_to_centralized']:.3f} ({'met' if ok_ppl else 'NOT met'}), "
                   f"bytes {diloco['bytes_saving_vs_sync']:.1f}x ({'met' if ok_bytes else 'NOT met'})")
        print(verdict)
        md += "\n" + verdict
    (args.out / "pretrain.md").write_text(md + "\n")
    (args.out / "pretrain.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                        "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
