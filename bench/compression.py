"""Accuracy against cumulative upload bytes, for each codec chain on the wire.

The default job (all-MiniLM-L6-v2 + LoRA, BBC News, Dirichlet(0.5), 20
clients, 5 per round), run once per codec chain with the same seed, split,
cohorts and local steps:

* ``none``: the plain float32 wire (the baseline);
* ``fp16``: every upload rounded to half precision;
* ``int8`` / ``int4``: unbiased stochastic quantization, one scale per 64 values;
* ``topk_ef``: the 10% largest entries of each tensor, with client-side error
  feedback (Stich et al. 2018; Karimireddy et al. 2019);
* ``topk_int8``: top-10% then int8 on the kept values, with error feedback.

Every run evaluates every ``--eval-every`` rounds; each evaluation is one
point (cumulative bytes uploaded, test accuracy) of its curve. The table
reports the final accuracy, its gap to ``none``, the total upload bytes and
the compression factor against uploading the full float32 model
(``summary.json`` -> ``compression.factor_vs_full_model``) and against the
uncoded trainable state.

Usage::

    python bench/compression.py --out runs/bench-compression --threads 1
    python bench/compression.py --codecs none int8 --set federation.rounds=2   # smoke

Prints and writes ``OUT/compression.md``, ``OUT/compression.json`` and
``OUT/compression.png`` (accuracy vs cumulative MB uploaded, log scale).
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sweep import add_run_args, run_one

CODECS = {
    "none": [],
    "fp16": ["compression.upload=[fp16]"],
    "int8": ["compression.upload=[int8]", "compression.chunk_size=64"],
    "int4": ["compression.upload=[int4]", "compression.chunk_size=64"],
    "topk_ef": ["compression.upload=[topk]", "compression.topk_fraction=0.1", "compression.error_feedback=true"],
    "topk_int8": ["compression.upload=[topk,int8]", "compression.topk_fraction=0.1", "compression.chunk_size=64",
                  "compression.error_feedback=true"],
}


def extract(summary: dict) -> dict:
    c = summary.get("compression") or {}
    return {
        "accuracy": summary.get("final_accuracy"),
        "bytes_up": summary.get("bytes_up_total"),
        "uploads": c.get("uploads"),
        "factor_vs_full_model": c.get("factor_vs_full_model"),
        "factor_vs_trainable_state": c.get("factor_vs_trainable_state"),
        "wall_s": summary.get("wall_s"),
        "run_dir": summary.get("run_dir"),
    }


def curve(run_dir: Path) -> list[tuple[int, int, float]]:
    """(round, cumulative upload bytes, test accuracy) at every evaluated round."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    recs = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [(r["round"], r["bytes_up_total"], r["test_accuracy"]) for r in recs if "test_accuracy" in r]


def table(rows: dict) -> str:
    base = rows.get("none", {}).get("accuracy")
    lines = ["| codec | final acc (%) | vs none (points) | MB up | factor vs full model | factor vs trainable "
             "| wall (s) |", "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        if r.get("status") == "error":
            lines.append(f"| {name} | error: {r['error']} | | | | | |")
            continue
        gap = "" if base is None else f"{100 * (r['accuracy'] - base):+.1f}"
        lines.append(f"| {name} | {100 * r['accuracy']:.1f} | {gap} | {r['bytes_up'] / 1e6:.2f} "
                     f"| {r['factor_vs_full_model']:.0f}x | {r['factor_vs_trainable_state']:.2f}x "
                     f"| {r['wall_s']:.0f} |")
    return "\n".join(lines)


def plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in rows.items():
        pts = [(b / 1e6, a) for _, b, a in r.get("curve", []) if b > 0]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("cumulative upload (MB, log scale)")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench-compression")
    ap.add_argument("--codecs", nargs="+", default=list(CODECS), choices=list(CODECS))
    ap.add_argument("--eval-every", type=int, default=5)
    add_run_args(ap)
    args = ap.parse_args()
    out = Path(args.out)
    t0 = time.perf_counter()
    common = [f"eval.every={args.eval_every}", f"seed={args.seed}", f"threads={args.threads}", *args.set]

    def job(name: str) -> tuple[str, dict]:
        run_dir = out / name
        res = run_one(None, CODECS[name] + common + [f"name=compression-{name}"], run_dir,
                      out / "logs" / f"{name}.log", force=args.force, extract=extract)
        res["curve"] = curve(run_dir)
        print(f"  {name}: {res.get('status')} {res.get('accuracy', res.get('error'))}", flush=True)
        return name, res

    with ThreadPoolExecutor(args.jobs) as pool:
        rows = dict(pool.map(job, args.codecs))
    header = f"default job (MiniLM + LoRA, BBC News), seed {args.seed}; overrides: {' '.join(common)}"
    text = table(rows)
    print("\n" + header + "\n\n" + text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compression.md").write_text(header + "\n\n" + text + "\n")
    (out / "compression.json").write_text(json.dumps(
        {"overrides": common, "codecs": {k: CODECS[k] for k in args.codecs}, "rows": rows,
         "wall_s": time.perf_counter() - t0}, indent=2))
    plot(rows, out / "compression.png")
    print(f"\nwrote {out / 'compression.md'}, compression.json, compression.png")


if __name__ == "__main__":
    main()
