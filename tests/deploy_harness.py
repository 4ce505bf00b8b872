"""Real Flower processes on 127.0.0.1 for the deployment tests: started by the test, always cleaned up.

Every process runs in its own session (process group) and is killed with
its children when the test ends, passes or fails (SIGTERM, then SIGKILL).
Every wait is bounded.
"""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file


TINY = {
    "model.name": "tiny-bert", "model.lora.r": 4, "model.max_length": 16,
    "federation.num_clients": 3, "federation.clients_per_round": 2, "federation.rounds": 2,
    "federation.partition.alpha": 1.0, "train.local_steps": 4, "train.batch_size": 8, "train.lr": 0.05,
    "eval.every": 1, "threads": 1, "workers": 1, "progress": False,
    "deploy.round_timeout_s": 120, "deploy.join_timeout_s": 120,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overrides(extra: dict) -> list[str]:
    return [f"{k}={v}" for k, v in {**TINY, **extra}.items()]


def node_files(folder: Path, over: list[str]) -> list[Path]:
    """The topic dataset and, per simulated client, a file with exactly its rows (as a node holds them)."""
    from fedfm.build import build_clients
    from fedfm.config import load_config
    from fedfm.data.sources import load_text_dataset

    cfg = load_config(None, over)
    ds = load_text_dataset(cfg.data, cfg.model.task, seed=cfg.seed)
    _, clients, _ = build_clients(cfg, ds)
    paths = []
    for c in clients:
        path = folder / f"node{c.cid}.csv"
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            for i in np.sort(np.concatenate([c.train_idx, c.test_idx])):
                w.writerow([ds.texts[i], ds.label_names[ds.labels[i]]])
        paths.append(path)
    return paths


class Cluster:
    """The processes of one test; ``stop()`` kills them all (also on failure, from the fixture)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}

    def fedfm(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "fedfm", *args]

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "w")
        proc = subprocess.Popen(self.fedfm(*args), stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                cwd=self.folder, start_new_session=True)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")

    def wait_for(self, name: str, text: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if text in self.log(name):
                return
            if self.procs[name].poll() is not None:
                raise AssertionError(f"{name} exited ({self.procs[name].returncode}):\n{self.log(name)[-3000:]}")
            time.sleep(0.3)
        raise AssertionError(f"{name}: no {text!r} within {timeout_s}s:\n{self.log(name)[-3000:]}")

    def run(self, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(self.fedfm(*args), capture_output=True, text=True, env=self.env, cwd=self.folder,
                              timeout=timeout_s)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(name)
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        proc.wait(30)

    def stop(self) -> None:
        for proc in self.procs.values():
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.procs.clear()


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(sim: Path, dep: Path) -> None:
    """The deployed run folder ``dep`` holds the simulated run ``sim``: same final state, cohorts, bytes, metrics."""
    a, b = load_file(sim / "final_state.safetensors"), load_file(dep / "final_state.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
    exact = ("round", "cohort", "accepted", "bytes_up", "bytes_down", "version")
    close = ("test_accuracy", "test_loss", "train_loss")
    sim_rows, dep_rows = records(sim), records(dep)
    assert [{k: r.get(k) for k in exact} for r in dep_rows] == [{k: r.get(k) for k in exact} for r in sim_rows]
    for s, d in zip(sim_rows, dep_rows):
        assert [d.get(k) for k in close] == pytest.approx([s.get(k) for k in close], nan_ok=True)
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "final_state.safetensors", "metrics.png",
                 "partition.json"):
        assert (dep / name).is_file(), name
