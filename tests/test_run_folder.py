"""A run folder is owned by one run (fedfm.run_folder): lock, one run per folder, run ids, clean failures.

Most checks fail before anything is built, so they cost no training; one
short run (one round) covers ``--overwrite``, the lock held mid-run and a
full disk while checkpointing, through the command line.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import fedfm
from fedfm import run_folder
from fedfm.cli import app
from fedfm.config import load_config, to_dict
from fedfm.errors import FedfmError
from fedfm.server import checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from test_end_to_end import tiny_cls_overrides  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


def short(tmp_path, out, **extra):
    """One round of one local step: the cheapest real run."""
    base = {"federation.rounds": 1, "train.local_steps": 1, "eval.every": 0, "model.method": "lora",
            "threads": 1, "workers": 1, "out": str(out)}
    return tiny_cls_overrides(tmp_path, **{**base, **extra})


def one_line_error(res, *needles):
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1, res.output
    for needle in needles:
        assert needle in lines[0], lines[0]


# -- the lock -----------------------------------------------------------------------
def test_a_locked_folder_refuses_a_second_run_at_once(tmp_path):
    out = tmp_path / "run"
    with run_folder.claim(out) as held:  # another run holds it (here: this process, another descriptor)
        with pytest.raises(FedfmError, match=rf"in use by another run \(pid {os.getpid()}\)"):
            fedfm.run(None, short(tmp_path, out))
        cfg = to_dict(load_config(None, short(tmp_path, out)))
        (out / "config.yaml").write_text(yaml.safe_dump(cfg))
        with pytest.raises(FedfmError, match="in use by another run"):
            fedfm.run(resume=out)  # resuming a run that is still running is refused too
        assert held.path == out and (out / run_folder.LOCK_FILE).is_file()
    assert not (out / run_folder.LOCK_FILE).exists()  # released: the lock file goes with it
    run_folder.claim(out, resume=True).release()  # free again


def test_the_kernel_drops_the_lock_of_a_killed_run(tmp_path):
    out = tmp_path / "run"
    code = "import sys, time; from fedfm.run_folder import claim; claim(sys.argv[1]); print('held', flush=True); time.sleep(60)"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(FedfmError, match=rf"in use by another run \(pid {child.pid}\)"):
            run_folder.claim(out, resume=True)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert (out / run_folder.LOCK_FILE).is_file()  # left behind by kill -9, but no longer locked
    run_folder.claim(out, resume=True).release()


# -- one run per folder -------------------------------------------------------------------
def test_a_new_run_refuses_a_folder_with_files_and_an_unnamed_run_never_collides(tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    res = CliRunner().invoke(app, ["run", *short(tmp_path, out), "-q"])
    one_line_error(res, f"out={out} already holds files", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # untouched, no lock file left
    with pytest.raises(FedfmError, match="exclude each other"):
        run_folder.claim(out, resume=True, overwrite=True)

    first = run_folder.claim(tmp_path / "runs" / "job-1", unique=True)
    second = run_folder.claim(tmp_path / "runs" / "job-1", unique=True)
    assert (first.path.name, second.path.name) == ("job-1", "job-1-2")
    assert run_folder.run_id(first.path) != run_folder.run_id(second.path)
    first.release()
    second.release()


def test_overwrite_clears_the_folder_and_a_full_disk_is_one_line(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("old run")
    (out / "checkpoints").mkdir()
    (out / "run.json").write_text(json.dumps({"run_id": "old"}))
    seen = {}

    def disk_full(tensors, path, metadata=None):  # the first checkpoint finds the disk full
        seen["files"] = sorted(p.name for p in out.iterdir())
        with pytest.raises(FedfmError, match="in use by another run"):  # mid-run, the folder is locked
            run_folder.claim(out, resume=True)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    res = CliRunner().invoke(app, ["run", *short(tmp_path, out), "--overwrite", "-q"])
    one_line_error(res, f"cannot write checkpoint {out / 'checkpoints' / 'v000001.json'}", "No space left on device")
    assert "notes.txt" not in seen["files"] and "config.yaml" in seen["files"]  # cleared first, then written
    assert run_folder.run_id(out) != "old"
    assert not (out / run_folder.LOCK_FILE).exists()  # released on the error


def test_os_errors_on_the_run_folder_are_one_line(tmp_path):
    with pytest.raises(FedfmError, match=r"I/O error on .*missing.*No such file or directory"):
        with run_folder.io_errors():
            open(tmp_path / "missing" / "metrics.jsonl", "w")
    if os.geteuid() == 0:
        pytest.skip("root ignores folder permissions")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        res = CliRunner().invoke(app, ["run", *short(tmp_path, ro), "-q"])
    finally:
        ro.chmod(0o755)
    one_line_error(res, str(ro), "Permission denied")


# -- a failed start leaves nothing behind ----------------------------------------------------
def test_a_failed_start_leaves_no_folder_and_an_existing_one_untouched(tmp_path):
    bad_model = {"model.name": str(tmp_path / "no-such-model")}
    new = tmp_path / "new" / "deep"
    with pytest.raises(FedfmError, match="model not found"):  # fails after the data (and partition.json)
        fedfm.run(None, short(tmp_path, new, **bad_model))
    assert not (tmp_path / "new").exists()
    with pytest.raises(FedfmError):
        fedfm.run(None, short(tmp_path, new, **{"data.dataset": str(tmp_path / "missing.csv")}))
    assert not (tmp_path / "new").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FedfmError, match="model not found"):
        fedfm.run(None, short(tmp_path, empty, **bad_model))
    assert list(empty.iterdir()) == []


# -- checkpoints of another run ----------------------------------------------------------------
def _server(version):
    from fedfm.algorithms.fedavg import FedAvg
    from fedfm.server.server import Server

    s = Server(FedAvg(), {"w": torch.full((2,), float(version))})
    s.version = version
    return s


def test_checkpoints_of_another_run_are_neither_pruned_nor_loaded(tmp_path):
    other, mine = tmp_path / "other", tmp_path / "mine"
    for folder in (other, mine):
        run_folder.claim(folder).release()
    checkpoint.Checkpointer(other, keep=5).save(9, _server(9), metrics_lines=0)
    foreign = sorted((other / "checkpoints").iterdir())
    (mine / "checkpoints").mkdir()
    for f in foreign:  # a newer checkpoint of another run lands in this folder
        (mine / "checkpoints" / f.name).write_bytes(f.read_bytes())
    orphan = mine / "checkpoints" / "v000012.safetensors"  # another run's tensor file without its JSON
    orphan.write_bytes(foreign[1].read_bytes())

    ck = checkpoint.Checkpointer(mine, keep=1)
    for v in (1, 2, 3):
        ck.save(v, _server(v), metrics_lines=0)
    names = sorted(p.name for p in (mine / "checkpoints").iterdir())
    assert names == ["v000003.json", "v000003.safetensors", "v000009.json", "v000009.safetensors",
                     "v000012.safetensors"]
    assert checkpoint.latest(mine).name == "v000003.json"
    meta, tensors, _ = checkpoint.load_for_resume(mine, mine, every=1)
    assert meta["version"] == 3 and torch.equal(tensors["global/w"], torch.full((2,), 3.0))
    with pytest.raises(FedfmError, match="belongs to another run"):  # never overwritten either
        ck.save(9, _server(9), metrics_lines=0)
