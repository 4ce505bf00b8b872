"""Speed and memory of multi-process simulation against the plain single-process loop.

Each side runs end to end in its own process (start-up, data, model, the
round, a final test-set evaluation), and the script samples the memory of the
whole process tree every 250 ms (reading ``smaps_rollup`` costs CPU: sampling
every 20 ms slowed the two-worker runs by a quarter):

* ``plain``: the hand-written FedAvg loop of ``bench/overhead.py`` in one
  process with 2 compute threads, then a plain evaluation loop;
* ``fedfm-1``: ``fedfm run workers=1 threads=2`` (one process, as before);
* ``fedfm-W``: ``fedfm run workers=W`` (default W = 2 here): W processes
  forked after start-up, one compute thread each.

Scenarios (the core issue's overhead benchmark and a many-small-clients one):

* ``lora50``: 50 clients, 10 per round, 20 local steps, 1 round;
* ``small200``: 200 clients, all in the round, 1 local step each.

Ratios printed: ``speed-up = plain wall / fedfm wall`` (goal >= 1.4), and the
tree's peak memory against the plain loop's (goal <= 1.3x), both as the
sum of RSS (pages shared by forked workers counted once per process) and as
the sum of PSS (shared pages split between the processes that map them: the
memory the tree really holds). ``--population`` instead compares the peak
memory of a run with 1,000 clients against one with 10 (same cohort size,
goal <= 1.5x), and prints clients trained per second.

    python bench/scale.py                      # both scenarios
    python bench/scale.py --scenario small200 --workers 2
    python bench/scale.py --population         # 1,000 vs 10 clients
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SCENARIOS = {  # clients, per round, local steps, rounds
    "lora50": (50, 10, 20, 1),
    "small200": (200, 200, 1, 1),
}


def overrides(num_clients: int, per_round: int, steps: int, rounds: int) -> list[str]:
    return [
        f"federation.num_clients={num_clients}", f"federation.clients_per_round={per_round}",
        f"federation.rounds={rounds}", "federation.partition.scheme=iid", "federation.partition.min_examples=2",
        f"train.local_steps={steps}", "train.batch_size=8", "model.max_length=64", "data.test_fraction=0.1",
        "eval.every=0", "eval.clients=false", "progress=false",
    ]


# -- memory of a process tree, from /proc -------------------------------------------------
def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo.extend(int(c) for c in (task / "children").read_text().split())
            except OSError:
                pass
    return out


def _kib(path: str, key: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeMemory(threading.Thread):
    """Peak of the sum of RSS and of PSS over a process and its descendants (MiB)."""

    def __init__(self, pid: int, every: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.peak_rss = self.peak_pss = 0.0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            pids = _tree(self.pid)
            rss = sum(_kib(f"/proc/{p}/status", "VmRSS:") for p in pids) / 1024
            pss = sum(_kib(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids) / 1024
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            time.sleep(self.every)


def measure(cmd: list[str], log: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        mem = TreeMemory(proc.pid)
        mem.start()
        code = proc.wait()
        mem.done.set()
        mem.join()
    wall = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed (exit {code}); see {log}")
    return {"wall_s": wall, "peak_rss_mib": mem.peak_rss, "peak_pss_mib": mem.peak_pss}


# -- the plain side: run in a child process (``--plain``) ----------------------------------------
def plain_main(args: list[str], threads: int) -> None:
    import numpy as np
    import torch

    from fedfm.config import load_config
    from fedfm.data.encode import encode
    from fedfm.data.sources import load_text_dataset
    from fedfm.models import build_model
    from fedfm.models.state import get_state
    from fedfm.build import build_clients, split_holdout
    from fedfm.drivers.simulation import sample_cohort
    from overhead import plain_loop

    torch.set_num_threads(threads)
    cfg = load_config(None, args)
    ds = load_text_dataset(cfg.data, cfg.model.task, seed=cfg.seed)
    holdout = split_holdout(cfg, ds)
    test_idx, clients, _ = build_clients(cfg, ds, holdout)
    fm = build_model(cfg.model, len(ds.label_names), seed=cfg.seed)
    enc = encode(ds.texts, fm.tokenizer, cfg.model.max_length, ds.labels)
    f = cfg.federation
    cohorts = [(r, sample_cohort(f.num_clients, f.clients_per_round, cfg.seed, r)) for r in range(1, f.rounds + 1)]
    state = plain_loop(fm.model, fm.params, enc, clients, get_state(fm.params), cohorts, cfg.train.local_steps,
                       cfg.train.batch_size, cfg.train.lr, cfg.seed, fm.task)
    with torch.no_grad():  # a plain evaluation of the final model on the test set
        for k, p in fm.params.items():
            p.copy_(state[k])
        fm.model.eval()
        correct = 0
        for i in range(0, len(test_idx), 64):
            idx = torch.as_tensor(test_idx[i : i + 64])
            width = int(enc.lengths[idx].max())
            logits = fm.model(input_ids=enc.input_ids[idx, :width], attention_mask=enc.attention_mask[idx, :width]).logits
            correct += int((logits.argmax(-1) == enc.labels[idx]).sum())
    print(json.dumps({"accuracy": correct / len(test_idx), "clients": int(np.sum([len(c) for _, c in cohorts]))}))


def fedfm_cmd(args: list[str], out: Path, workers: int, threads: int | None) -> list[str]:
    extra = [f"workers={workers}"] + ([f"threads={threads}"] if threads else [])
    return [sys.executable, "-m", "fedfm", "run", *args, *extra, f"out={out}"]


def scenario(name: str, workers: int, tmp: Path) -> dict:
    args = overrides(*SCENARIOS[name])
    rows = {
        "plain (2 threads)": measure([sys.executable, __file__, "--plain", "--threads", "2", "--", *args],
                                     tmp / f"{name}-plain.log"),
        "fedfm workers=1 threads=2": measure(fedfm_cmd(args, tmp / f"{name}-w1", 1, 2), tmp / f"{name}-w1.log"),
        f"fedfm workers={workers}": measure(fedfm_cmd(args, tmp / f"{name}-w{workers}", workers, None),
                                            tmp / f"{name}-w{workers}.log"),
    }
    base = rows["plain (2 threads)"]
    clients = SCENARIOS[name][1] * SCENARIOS[name][3]
    print(f"\n{name}: {SCENARIOS[name][0]} clients, {SCENARIOS[name][1]} per round, {SCENARIOS[name][2]} steps, "
          f"{SCENARIOS[name][3]} round(s)")
    print("| run | wall s | speed-up vs plain | clients/s | peak RSS sum MiB (x plain) | peak PSS sum MiB (x plain) |")
    print("|---|---|---|---|---|---|")
    for label, r in rows.items():
        r["speedup"] = base["wall_s"] / r["wall_s"]
        r["rss_ratio"] = r["peak_rss_mib"] / base["peak_rss_mib"]
        r["pss_ratio"] = r["peak_pss_mib"] / base["peak_pss_mib"]
        print(f"| {label} | {r['wall_s']:.1f} | {r['speedup']:.2f}x | {clients / r['wall_s']:.1f} | "
              f"{r['peak_rss_mib']:.0f} ({r['rss_ratio']:.2f}x) | {r['peak_pss_mib']:.0f} ({r['pss_ratio']:.2f}x) |")
    return rows


def population(workers: int, tmp: Path) -> dict:
    rows = {}
    for n in (10, 1000):
        args = overrides(n, 10, 1, 3)
        rows[n] = measure(fedfm_cmd(args, tmp / f"pop{n}", workers, None), tmp / f"pop{n}.log")
    print("\npopulation: 10 per round, 1 step, 3 rounds")
    print("| clients | wall s | peak RSS sum MiB | peak PSS sum MiB |")
    print("|---|---|---|---|")
    for n, r in rows.items():
        print(f"| {n} | {r['wall_s']:.1f} | {r['peak_rss_mib']:.0f} | {r['peak_pss_mib']:.0f} |")
    print(f"1,000 / 10 clients peak memory: RSS {rows[1000]['peak_rss_mib'] / rows[10]['peak_rss_mib']:.2f}x, "
          f"PSS {rows[1000]['peak_pss_mib'] / rows[10]['peak_pss_mib']:.2f}x (goal <= 1.5x)")
    return rows


def main() -> None:
    if "--plain" in sys.argv:
        i = sys.argv.index("--")
        threads = int(sys.argv[sys.argv.index("--threads") + 1])
        return plain_main(sys.argv[i + 1 :], threads)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="all")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--population", action="store_true", help="1,000 clients against 10: peak memory")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fedfm-scale-"))
    if args.population:
        result = {"population": population(args.workers, tmp)}
    else:
        names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
        result = {n: scenario(n, args.workers, tmp) for n in names}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print(f"\nlogs in {tmp}")


if __name__ == "__main__":
    main()
