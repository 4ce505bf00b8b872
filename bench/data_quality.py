"""Client-side data quality on the default job with injected bad data: how much accuracy comes back?

The default job (all-MiniLM-L6-v2 + LoRA on BBC News, 20 clients, Dirichlet(0.5),
5 per round, 15 rounds), with bad data injected into 30% of the clients after
the partition (so the global test set stays clean): on each bad client

* 50% of its training rows get a wrong label (uniform over the other classes);
* spam rows are added until they make up 30% of its rows: copies of three spam
  messages (each with one label drawn at random), half of them verbatim and
  half with a short reference number appended (near-duplicates).

Conditions, each over ``--seeds`` (default 0 1 2: its own partition, bad
clients, noise and cohorts):

* ``clean``: the default job without injected data (the ceiling);
* ``noisy``: plain FedAvg on the bad data;
* ``filter``: ``data.quality`` on the clients: exact and near-duplicate removal,
  plus the loss filter (rows whose label the current global model gives less
  than 5% probability, from global version 5 on);
* ``quality``: the same filters and ``algorithm.weighting=quality`` (each client
  weighted by examples x the fraction of its rows it kept; FedDQC, Du et al. 2024);
* ``dedup`` (not run by default): duplicate removal alone, no loss filter.

The table gives the final global test accuracy as mean ± std over the seeds and the
share of the accuracy lost to the bad data that each condition recovers,
``(acc - noisy) / (clean - noisy)``. The goal: the best option recovers at least half.

The injection patches ``fedfm.build.build_clients`` in each job's own process
(a job is one spawned process, so nothing leaks between runs); everything else
is an ordinary ``fedfm`` run writing its own folder (and ``FOLDER.log``), reused when its
``summary.json`` exists and its config and injection are unchanged.

Usage::

    python bench/data_quality.py --out runs/bench-data-quality --jobs 2 --threads 1
    python bench/data_quality.py --quick          # smoke: 1 seed, 2 rounds, small data

Prints and writes ``OUT/data_quality.md`` and ``OUT/data_quality.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import yaml  # noqa: E402

INJECTION = {"bad_fraction": 0.3, "label_noise": 0.5, "spam_fraction": 0.3}
SPAM = [
    "congratulations you have been selected to receive a free prize worth one thousand pounds "
    "click the link below today to claim your reward before the offer expires",
    "earn money fast from home with this one simple trick that banks do not want you to know "
    "sign up now and start receiving cash payments every single week",
    "limited time offer buy cheap watches and designer bags at ninety percent discount "
    "visit our online shop today free delivery on every order worldwide",
]
# The loss filter drops a row when the global model gives its label less than 5% probability (loss above
# ln 20 = 2.996): a row the model confidently contradicts, as a flipped label is, while a hard but correctly
# labelled row usually keeps more (confident learning, Northcutt et al. 2021, in its simplest form). Seen on
# seeds 0 and 1: ln 5 (below chance) dropped those hard rows too and cost 0.7-0.9 points against no filter.
# It starts at global version 5 (a third of the run): scored by a barely trained model, every row of a class
# it does not know yet is "surprising" (from version 1 with ln 5, seed 0 fell to 0.804). The MAD rule is off:
# once the model is good, median + 3 MAD of a client's losses is a small loss.
FILTERS = ["data.quality.enabled=true", "data.quality.loss_filter=true", "data.quality.loss_k=null",
           "data.quality.loss_max=2.996", "data.quality.loss_start_version=5"]
CONDITIONS = {
    "clean": {"inject": False, "set": []},
    "noisy": {"inject": True, "set": []},
    "filter": {"inject": True, "set": FILTERS},
    "quality": {"inject": True, "set": FILTERS + ["algorithm.weighting=quality"]},
    "dedup": {"inject": True, "set": ["data.quality.enabled=true"]},
}
DEFAULT_CONDITIONS = ["clean", "noisy", "filter", "quality"]
QUICK = ["federation.rounds=2", "federation.num_clients=10", "federation.clients_per_round=3",
         "data.max_examples=400", "train.local_steps=2", "eval.max_test_examples=100"]


# -- the injection (runs inside each job's process) ---------------------------------------------------
def inject(ds, clients, seed: int, spec: dict) -> dict:
    """Corrupt the training rows of ``bad_fraction`` of ``clients`` in place; what was done, per client."""
    rng = np.random.default_rng([seed, 0xBADDA7A])
    num_classes = len(ds.label_names)
    labels = np.array(ds.labels, dtype=np.int64, copy=True)
    texts = list(ds.texts)
    spam_labels = rng.integers(0, num_classes, size=len(SPAM))
    bad = sorted(int(c) for c in rng.choice(len(clients), size=round(spec["bad_fraction"] * len(clients)),
                                            replace=False))
    done = {}
    for cid in bad:
        c = clients[cid]
        rows = c.train_idx
        noisy = rng.choice(rows, size=round(spec["label_noise"] * len(rows)), replace=False)
        labels[noisy] = (labels[noisy] + rng.integers(1, num_classes, size=len(noisy))) % num_classes
        n_spam = math.ceil(spec["spam_fraction"] * len(rows) / (1 - spec["spam_fraction"]))
        new = []
        for j in range(n_spam):
            k = int(rng.integers(len(SPAM)))
            text = SPAM[k] if j % 2 == 0 else f"{SPAM[k]} ref {int(rng.integers(10_000, 99_999))}"
            texts.append(text)
            new.append(len(texts) - 1)
            labels = np.append(labels, spam_labels[k])
        c.train_idx = np.concatenate([rows, np.asarray(new, dtype=np.int64)])
        done[cid] = {"rows": int(len(rows)), "flipped": int(len(noisy)), "spam": n_spam}
    ds.texts, ds.labels = texts, labels
    return done


def run_job(condition: str, seed: int, overrides: list[str], run_dir: str, threads: int) -> dict:
    """One run in this (spawned) process: patch the clients' data when the condition injects, then run."""
    import torch

    import fedfm.build as build
    from fedfm.runner import run

    torch.set_num_threads(threads)
    injected: dict = {}
    if CONDITIONS[condition]["inject"]:
        original = build.build_clients

        def build_clients(cfg, ds, holdout=None):
            test_idx, clients, stats = original(cfg, ds, holdout)
            injected.update(inject(ds, clients, cfg.seed, INJECTION))
            return test_idx, clients, stats

        build.build_clients = build_clients
    from rich.console import Console

    Path(run_dir).parent.mkdir(parents=True, exist_ok=True)
    with open(f"{run_dir}.log", "w") as log:  # the run's own summary table goes to its log, not the bench's output
        summary = run(None, overrides + [f"out={run_dir}"], console=Console(file=log, width=120), overwrite=True)
    facts = {"condition": condition, "seed": seed, "injection": INJECTION if injected else None,
             "bad_clients": {str(c): v for c, v in injected.items()}}
    Path(run_dir, "injection.json").write_text(json.dumps(facts, indent=1))
    return extract(summary)


def extract(summary: dict) -> dict:
    dq = summary.get("data_quality") or {}
    return {"accuracy": summary.get("final_accuracy"), "wall_s": summary.get("wall_s"),
            "kept": dq.get("kept"), "dropped": dq.get("dropped")}


def reusable(run_dir: Path, overrides: list[str], inject_on: bool) -> dict | None:
    """A finished run of the same config and injection, or None."""
    from fedfm.config import load_config, to_dict

    try:
        old = yaml.safe_load((run_dir / "config.yaml").read_text())
        new = to_dict(load_config(None, overrides + [f"out={run_dir}"]))
        facts = json.loads((run_dir / "injection.json").read_text())
        summary = json.loads((run_dir / "summary.json").read_text())
    except Exception:  # noqa: BLE001 - anything missing or unreadable is simply rerun
        return None
    for k in ("threads", "progress", "name"):
        old.pop(k, None)
        new.pop(k, None)
    if old != new or (facts["injection"] == INJECTION) != inject_on:
        return None
    return extract(summary)


# -- the table ------------------------------------------------------------------------------------------
def mean_std(values: list[float]) -> str:
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * sd:.1f}"


def table(results: dict[str, dict[int, dict]]) -> tuple[str, dict]:
    acc = {c: [r["accuracy"] for r in runs.values() if r.get("accuracy") is not None] for c, runs in results.items()}
    means = {c: statistics.mean(v) for c, v in acc.items() if v}
    gap = means.get("clean", math.nan) - means.get("noisy", math.nan)
    lines = ["| condition | test accuracy (%), mean ± std | recovered of the loss | seeds | rows kept / dropped |",
             "|---|---|---|---|---|"]
    recovered = {}
    for c, runs in results.items():
        rec = (means[c] - means["noisy"]) / gap if c in means and "noisy" in means and gap > 0 else None
        recovered[c] = rec
        first = next(iter(runs.values()), {})
        rows = "" if first.get("kept") is None else f"{first['kept']} / {sum(first['dropped'].values())} (seed {next(iter(runs))})"
        errors = [r["error"] for r in runs.values() if r.get("error")]
        lines.append(f"| {c} | {mean_std(acc[c])} | {'n/a' if rec is None else f'{100 * rec:.0f}%'} "
                     f"| {len(acc[c])}{' (' + errors[0] + ')' if errors else ''} | {rows} |")
    best = max((c for c in recovered if c not in ("clean", "noisy") and recovered[c] is not None),
               key=lambda c: recovered[c], default=None)
    if best is None or not gap > 0:
        verdict = "goal not checked: needs clean, noisy and at least one option, with clean above noisy"
    else:
        verdict = (f"accuracy lost to bad data: {100 * gap:.1f} points; best option {best} recovers "
                   f"{100 * recovered[best]:.0f}% ({'meets' if recovered[best] >= 0.5 else 'does NOT meet'} "
                   f"the goal of at least half)")
    return "\n".join(lines) + "\n\n" + verdict, {"recovered": recovered, "best": best, "verdict": verdict}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench-data-quality")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--conditions", nargs="+", default=DEFAULT_CONDITIONS, choices=list(CONDITIONS))
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for every run")
    ap.add_argument("--quick", action="store_true", help="smoke run: seed 0, 2 rounds, 10 clients, 400 examples")
    ap.add_argument("--force", action="store_true", help="rerun finished runs")
    args = ap.parse_args()
    out = Path(args.out)
    seeds = [args.seeds[0]] if args.quick else args.seeds
    extra = (QUICK if args.quick else []) + args.set
    t0 = time.perf_counter()
    jobs, results = [], {c: {} for c in args.conditions}
    for c in args.conditions:
        for s in seeds:
            over = extra + CONDITIONS[c]["set"] + [f"seed={s}", f"threads={args.threads}", f"name=dq-{c}-{s}",
                                                   "progress=false"]
            run_dir = out / f"{c}-seed{s}"
            done = None if args.force else reusable(run_dir, over, CONDITIONS[c]["inject"])
            if done is not None:
                results[c][s] = {"status": "reused", **done}
            else:
                jobs.append((c, s, over, str(run_dir)))
    # one fresh process per job (max_tasks_per_child=1): the injection patches fedfm.build in its process, and a
    # reused process would carry the patch into the next job (a clean run injected, a noisy run injected twice)
    with ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=get_context("spawn"),
                             max_tasks_per_child=1) as pool:
        futures = {pool.submit(run_job, c, s, over, d, args.threads): (c, s) for c, s, over, d in jobs}
        for fut, (c, s) in futures.items():
            try:
                results[c][s] = {"status": "ok", **fut.result()}
            except Exception as err:  # noqa: BLE001 - one failed run is reported, not fatal
                results[c][s] = {"status": "error", "error": str(err).splitlines()[0][:200]}
            r = results[c][s]
            print(f"{c} seed {s}: {r.get('accuracy', r.get('error'))}", flush=True)
    text, facts = table(results)
    header = (f"Data quality on the default job{' (--quick smoke run, not a measurement)' if args.quick else ''}: "
              f"{int(100 * INJECTION['bad_fraction'])}% of clients with {int(100 * INJECTION['label_noise'])}% "
              f"label noise and {int(100 * INJECTION['spam_fraction'])}% duplicated spam rows; seeds {seeds}\n\n")
    print(header + text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_quality.md").write_text(header + text + "\n")
    (out / "data_quality.json").write_text(json.dumps({"seeds": seeds, "injection": INJECTION, "quick": args.quick,
                                                       "results": results, **facts,
                                                       "wall_s": time.perf_counter() - t0}, indent=1))


if __name__ == "__main__":
    main()
