"""Run many fedfm jobs as subprocesses and reuse the ones already finished.

Shared by the benchmark scripts in this folder. Each job is one ordinary
``python -m fedfm run [CONFIG] key=value ...`` in its own process (so an error
in one job is recorded, not fatal), writing to its own run folder; a job whose
``summary.json`` exists and whose saved config equals the one asked for is
reused, so an interrupted sweep resumes where it stopped. Run several at a
time with a thread pool and set ``threads=`` so they share the cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from fedfm.config import load_config, to_dict  # noqa: E402

IGNORED_KEYS = ("out", "threads", "progress", "device", "name")  # do not make a finished run stale


def run_one(
    config: str | None,
    overrides: list[str],
    run_dir: Path,
    log: Path,
    force: bool = False,
    extract: Callable[[dict], dict] = lambda s: s,
) -> dict:
    """One job: reuse a finished run of the same config, else ``python -m fedfm run``.

    Returns ``{"status": "ok" | "reused", **extract(summary)}`` or
    ``{"status": "error", "error": <last log line>, "wall_s": ...}``.
    """
    summary_path = run_dir / "summary.json"
    if not force and summary_path.exists() and same_config(run_dir / "config.yaml", config, overrides):
        return {"status": "reused", **extract(json.loads(summary_path.read_text()))}
    cmd = [sys.executable, "-m", "fedfm", "run", *([config] if config else []), *overrides,
           "progress=false", f"out={run_dir}"]
    t0 = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        fh.write(" ".join(cmd) + "\n")
        fh.flush()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0 or not summary_path.exists():
        lines = [x for x in log.read_text().splitlines() if x.strip()]
        return {"status": "error", "error": lines[-1] if lines else f"exit {proc.returncode}",
                "wall_s": time.perf_counter() - t0}
    return {"status": "ok", **extract(json.loads(summary_path.read_text()))}


def same_config(saved: Path, config: str | None, overrides: list[str]) -> bool:
    """Whether a finished run's saved config is the one these overrides make (up to IGNORED_KEYS)."""
    try:
        old = yaml.safe_load(saved.read_text())
        new = to_dict(load_config(config, overrides))
    except Exception:  # noqa: BLE001 - anything unreadable is simply rerun
        return False
    for k in IGNORED_KEYS:
        old.pop(k, None)
        new.pop(k, None)
    return old == new


def add_run_args(ap, seeds: bool = False) -> None:
    """The options every multi-run benchmark shares: seed (or ``--seeds``), parallel jobs, threads, overrides, --force."""
    if seeds:
        ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="each seed: its own partition, cohorts and noise")
    else:
        ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel (subprocesses)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for every run")
    ap.add_argument("--force", action="store_true", help="rerun finished runs")
