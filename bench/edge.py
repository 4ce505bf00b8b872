"""Edge clients: a frozen base held in float32, int8 or NF4 (``model.quantize``), measured.

Two jobs, each run per mode over ``--seeds`` (the same seed: the same split,
cohorts and adapter init in every mode, so a mode's cost is read against
float32 seed by seed):

* ``minilm``: the default job (all-MiniLM-L6-v2 + LoRA on BBC News, 20 clients,
  15 rounds): final test accuracy;
* ``smollm2``: ``examples/shakespeare_smollm2_lora.yaml`` (SmolLM2-135M + LoRA,
  30 roles, 6 rounds): final test perplexity.

For every run it reads ``summary.json``: the base's bytes as stored
(``client_memory.base_model_mb``), the measured peak memory of the clients while
they trained (mean and max over rounds), the wall seconds per local step and
the bytes uploaded. ``--load`` also builds each model once per mode in a fresh
process (every import done first) and reports how far its memory rises during
the build: the peak of its anonymous memory (what it allocates itself) and of
its resident set (the memory-mapped checkpoint's file pages included), to show
that a quantized load never allocates a float32 copy of the model.

Goals (issue 17): at least 3x less base-model memory than float32 with int8
or NF4, final accuracy within 1 point of float32 (perplexity within 5%), and
the step-time cost reported as measured. Runs in parallel (``--jobs``) share
the machine, so seconds per step are comparable only within one invocation.

Usage::

    python bench/edge.py --out runs/bench-edge --seeds 0 1 2 --jobs 2 --threads 1 --load
    python bench/edge.py --jobs-only minilm --modes none nf4 --set federation.rounds=2   # smoke

Prints and writes ``OUT/edge.md`` and ``OUT/edge.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sweep import ROOT, add_run_args, run_one

JOBS = {
    "minilm": {"config": None, "metric": "final_accuracy", "model": "minilm", "task": "seq_cls"},
    "smollm2": {"config": str(ROOT / "examples" / "shakespeare_smollm2_lora.yaml"), "metric": "final_perplexity",
                "model": "smollm2", "task": "causal_lm"},
}
MODES = ["none", "int8", "nf4"]


def extract(summary: dict) -> dict:
    mem = summary.get("client_memory") or {}
    return {"accuracy": summary.get("final_accuracy"), "perplexity": summary.get("final_perplexity"),
            "base_mb": mem.get("base_model_mb"), "peak_mb_mean": mem.get("peak_mb_mean"),
            "peak_mb_max": mem.get("peak_mb_max"), "step_s": mem.get("step_s_mean"),
            "bytes_up": summary.get("bytes_up_total"), "wall_s": summary.get("wall_s")}


LOAD_PROBE = """
import json, sys, threading, time
import torch, transformers, peft, torchao  # every import before the baseline, whatever the mode
from fedfm.config import load_config
from fedfm.models.build import build_model
from fedfm.models.quantize import model_bytes
def status():
    return {k: int(v.split()[0]) / 1024 for k, v in (l.split(":", 1) for l in open("/proc/self/status") if ":" in l)
            if k in ("VmRSS", "VmHWM", "RssAnon")}
cfg = load_config(None, sys.argv[1:]).model
base = status()
open("/proc/self/clear_refs", "w").write("5")
peak_anon, done = [base["RssAnon"]], threading.Event()
def sample():
    while not done.wait(0.002):
        peak_anon[0] = max(peak_anon[0], status()["RssAnon"])
t = threading.Thread(target=sample, daemon=True); t.start()
fm = build_model(cfg, num_labels=5 if cfg.task == "seq_cls" else None)
done.set(); t.join()
end = status()
print(json.dumps({"rss_rise_mb": end["VmHWM"] - base["VmRSS"],
                  "anon_rise_mb": max(peak_anon[0], end["RssAnon"]) - base["RssAnon"],
                  "model_mb": model_bytes(fm.model) / 2**20}))
"""


def load_peak(job: dict, mode: str) -> dict:
    """How far a fresh process's memory rises while it builds the model in ``mode`` (imports done first):
    the peak resident set (file pages of the memory-mapped checkpoint included) and the peak of its
    anonymous memory (what the process itself allocates; sampled every 2 ms)."""
    args = [f"model.name={job['model']}", f"model.task={job['task']}", "model.method=lora", f"model.quantize={mode}"]
    out = subprocess.run([sys.executable, "-c", LOAD_PROBE, *args], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def mean_std(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.mean(values):.{digits}f} ± {scale * sd:.{digits}f}"


def job_table(name: str, rows: dict[str, dict[int, dict]], loads: dict) -> str:
    job = JOBS[name]
    lm = job["metric"] == "final_perplexity"
    key = "perplexity" if lm else "accuracy"
    ref = rows.get("none", {})
    head = ("| mode | test perplexity | vs float32 (per seed) |" if lm else
            "| mode | test accuracy (%) | vs float32, points (per seed) |")
    lines = [head + " base model MB (× less) | peak client MB, mean / max | s per local step (× float32) "
             "| MB up | load: peak rise of allocated / resident MB |", "|---|---|---|---|---|---|---|---|"]
    base_ref = next((r["base_mb"] for r in ref.values() if r.get("base_mb")), None)
    for mode, runs in rows.items():
        ok = {s: r for s, r in runs.items() if r.get("status") != "error"}
        if not ok:
            err = next(iter(runs.values()), {}).get("error", "not run")
            lines.append(f"| {mode} | error: {err} | | | | | | |")
            continue
        vals = [r[key] for r in ok.values()]
        if lm:
            diffs = [r[key] / ref[s][key] - 1 for s, r in ok.items() if s in ref and ref[s].get(key)]
            diff = ", ".join(f"{100 * d:+.1f}%" for d in diffs)
        else:
            diffs = [100 * (r[key] - ref[s][key]) for s, r in ok.items() if s in ref and ref[s].get(key) is not None]
            diff = ", ".join(f"{d:+.1f}" for d in diffs)
        base = statistics.mean(r["base_mb"] for r in ok.values())
        factor = f" ({base_ref / base:.2f}×)" if base_ref else ""
        steps = [r["step_s"] for r in ok.values() if r.get("step_s")]
        ratio = [r["step_s"] / ref[s]["step_s"] for s, r in ok.items()
                 if s in ref and ref[s].get("step_s") and r.get("step_s")]
        step = f"{statistics.mean(steps):.3f}" if steps else "n/a"
        step += f" ({statistics.mean(ratio):.2f}×)" if ratio else ""
        peak = f"{mean_std([r['peak_mb_mean'] for r in ok.values()], digits=0)} / " \
               f"{max(r['peak_mb_max'] or 0 for r in ok.values()):.0f}"
        mb_up = statistics.mean(r["bytes_up"] for r in ok.values()) / 1e6
        load = loads.get(mode, {})
        load_s = f"{load['anon_rise_mb']:.0f} / {load['rss_rise_mb']:.0f}" if "anon_rise_mb" in load \
            else load.get("error", "")
        metric = mean_std(vals, digits=2) if lm else mean_std(vals, scale=100)
        lines.append(f"| {mode} | {metric} | {diff} | {base:.1f}{factor} | {peak} | {step} | {mb_up:.2f} | {load_s} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench-edge")
    ap.add_argument("--jobs-only", nargs="+", default=list(JOBS), choices=list(JOBS), help="which jobs to run")
    ap.add_argument("--modes", nargs="+", default=MODES, help="model.quantize modes (none is the baseline)")
    ap.add_argument("--load", action="store_true", help="also measure each model's load peak per mode")
    add_run_args(ap, seeds=True)
    args = ap.parse_args()
    out = Path(args.out)
    t0 = time.perf_counter()
    plan = []
    for name in args.jobs_only:
        for seed in args.seeds:
            for mode in args.modes:
                over = [f"model.quantize={mode}", f"seed={seed}", f"threads={args.threads}", "workers=1", *args.set]
                plan.append((name, mode, seed, over))
    results: dict = {n: {m: {} for m in args.modes} for n in args.jobs_only}

    def go(item):
        name, mode, seed, over = item
        run_dir = out / f"{name}-{mode}-seed{seed}"
        r = run_one(JOBS[name]["config"], over, run_dir, Path(f"{run_dir}.log"), force=args.force, extract=extract)
        results[name][mode][seed] = r
        print(f"{name} {mode} seed {seed}: {r.get('accuracy') or r.get('perplexity') or r.get('error')}", flush=True)

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        list(pool.map(go, plan))
    loads = {n: {m: load_peak(JOBS[n], m) for m in args.modes} if args.load else {} for n in args.jobs_only}
    text = []
    for name in args.jobs_only:
        text.append(f"### {name} (seeds {args.seeds})\n\n{job_table(name, results[name], loads[name])}")
    body = "\n\n".join(text)
    print(body)
    out.mkdir(parents=True, exist_ok=True)
    (out / "edge.md").write_text(body + "\n")
    (out / "edge.json").write_text(json.dumps({"seeds": args.seeds, "results": results, "loads": loads,
                                               "wall_s": time.perf_counter() - t0}, indent=1))


if __name__ == "__main__":
    main()
