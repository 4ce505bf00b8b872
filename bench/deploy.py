"""Deployment on Flower against the same job in simulation, in one command.

For each seed: the default job (``--set`` changes it) with ``--nodes`` clients,
all of them in every round, run (1) as a simulation (``fedfm run``, default
workers) and (2) deployed on 127.0.0.1: a SuperLink and one SuperNode per
client (``fedfm deploy node``, each with exactly the rows the simulation gives
that client, one torch thread each), submitted with ``fedfm deploy submit``.
Prints per seed and as mean ± std over seeds:

* wall time per round (mean over rounds 2.., the first builds the nodes'
  models) and its ratio deployed / simulated;
* start-up: the command's wall time minus its rounds (model loading, joining);
* payload bytes Flower carried against the server's byte ledger (equal).

    python bench/deploy.py [--nodes 5] [--rounds 4] [--seeds 0 1 2] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from deploy_harness import Cluster, free_port, node_files, records  # noqa: E402


def timing(run_dir: Path, wall: float) -> dict:
    rows = [r for r in records(run_dir) if r["round"] >= 1]
    later = [r["round_s"] for r in rows if r["round"] >= 2] or [rows[-1]["round_s"]]
    return {"round_s": statistics.mean(later), "startup_s": wall - sum(r["round_s"] for r in rows), "last": rows[-1]}


def one_seed(folder: Path, seed: int, nodes: int, rounds: int, sets: list[str]) -> dict:
    address = f"127.0.0.1:{free_port()}"
    over = [f"seed={seed}", f"federation.num_clients={nodes}", f"federation.clients_per_round={nodes}",
            f"federation.rounds={rounds}", "eval.every=0", "eval.clients=false", "progress=false",
            "deploy.insecure=true", f"deploy.superlink={address}", "deploy.round_timeout_s=1200", *sets]
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fedfm", "run", *over, f"out={folder / 'sim'}"], check=True,
                   capture_output=True)
    sim = timing(folder / "sim", time.perf_counter() - t)
    paths = node_files(folder, over)
    cluster = Cluster(folder)
    try:
        cluster.start("superlink", "deploy", "superlink", "--address", address, "--state", "sl", "--insecure")
        cluster.wait_for("superlink", "Application startup complete")
        for i, path in enumerate(paths):
            cluster.start(f"node{i}", "deploy", "node", "--data", str(path), "--name", f"client-{i:03d}",
                          "--state", f"state{i}", "--superlink", address, "--threads", "1", "--insecure")
        for i in range(nodes):
            cluster.wait_for(f"node{i}", "SuperNode ID")
        t = time.perf_counter()
        done = cluster.run("deploy", "submit", *over, f"out={folder / 'dep'}", timeout_s=3600)
        if done.returncode != 0:
            raise RuntimeError(done.stdout[-2000:] + done.stderr[-2000:])
        dep = timing(folder / "dep", time.perf_counter() - t)
    finally:
        cluster.stop()
    last = dep["last"]
    return {"seed": seed, "sim_round_s": sim["round_s"], "dep_round_s": dep["round_s"],
            "ratio": dep["round_s"] / sim["round_s"], "sim_startup_s": sim["startup_s"],
            "dep_startup_s": dep["startup_s"], "sim_accuracy": sim["last"].get("test_accuracy"),
            "dep_accuracy": last.get("test_accuracy"),
            "bytes_equal": (last["flower_payload_up"], last["flower_payload_down"])
            == (last["bytes_up_total"], last["bytes_down_total"]),
            "bytes_up": last["bytes_up_total"], "bytes_down": last["bytes_down_total"]}


def mean_std(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--set", dest="sets", action="append", default=[], help="key=value for both runs")
    args = ap.parse_args()
    rows = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix=f"fedfm-bench-deploy-{seed}-") as tmp:
            rows.append(one_seed(Path(tmp), seed, args.nodes, args.rounds, args.sets))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.nodes} nodes, {args.rounds} rounds, seeds {args.seeds}")
    for key in ("sim_round_s", "dep_round_s", "ratio", "sim_startup_s", "dep_startup_s"):
        print(f"{key:>14}: {mean_std([r[key] for r in rows])}")
    print(f"{'bytes equal':>14}: {all(r['bytes_equal'] for r in rows)}")


if __name__ == "__main__":
    main()
