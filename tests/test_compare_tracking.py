"""`fedfm compare` on tiny runs, and tracking to TensorBoard / MLflow read back against metrics.jsonl."""

import json
import math
import shutil
import struct
import sys

import pytest
from typer.testing import CliRunner

import fedfm
from fedfm.cli import app
from fedfm.config import load_config
from fedfm.eval.compare import FIGSIZE, DPI, compare_runs
from fedfm.eval.report import MetricsLog
from fedfm.eval.tracking import TensorBoardTracker, check_tracking, scalars
from fedfm.errors import FedfmError
from golden import write_topic_csv

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(tmp, name, **extra):
    base = {
        "model.name": "tiny-bert", "model.method": "full", "model.max_length": 16,
        "data.dataset": str(tmp / "topics.csv"), "data.max_examples": 60,
        "federation.num_clients": 3, "federation.clients_per_round": 2, "federation.rounds": 2,
        "train.local_steps": 2, "train.lr": 0.01, "eval.every": 1, "workers": 1, "progress": False,
        "out": str(tmp / name),
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def records_of(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny runs that differ in train.lr and tracking.kind (the second logs to TensorBoard)."""
    pytest.importorskip("tensorboard")
    tmp = tmp_path_factory.mktemp("runs")
    write_topic_csv(tmp / "topics.csv", n=90)
    fedfm.run(None, tiny(tmp, "a"))
    fedfm.run(None, tiny(tmp, "b", **{"train.lr": 0.03, "tracking": "tensorboard"}))
    return tmp / "a", tmp / "b"


def one_line(result):
    return result.output.strip().count("\n") == 0 and "Traceback" not in result.output


def png_size(path):
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_table_numbers_are_the_summaries_and_keys_the_changed_ones(runs, tmp_path):
    c = compare_runs([str(p) for p in runs])
    assert c.keys == ["tracking.kind", "train.lr"]  # out= differs too, but the row names the folder
    assert c.metrics == ["test_accuracy", "test_loss", "test_prior_accuracy"]  # summary.json's final block
    for row, run in zip(c.rows, runs):
        s = json.loads((run / "summary.json").read_text())
        assert row["status"] == "finished" and row["rounds"] == s["rounds"] == 2
        assert row["test_accuracy"] == s["final"]["test_accuracy"] == s["final_accuracy"]
        assert row["test_loss"] == s["final"]["test_loss"]
        assert row["test_prior_accuracy"] == s["final"]["test_prior_accuracy"] == s["prior_accuracy"]
        assert (row["bytes_up"], row["bytes_down"], row["wall_s"]) == (
            s["bytes_up_total"], s["bytes_down_total"], s["wall_s"])
    assert [(r["train.lr"], r["tracking.kind"]) for r in c.rows] == [(0.01, "none"), (0.03, "tensorboard")]

    png = tmp_path / "plots" / "cmp.png"
    result = CliRunner().invoke(app, ["compare", *map(str, runs), "--png", str(png)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for row in c.rows:
        line = next(x for x in lines if f" {row['run']} " in x)
        for shown in (f"{row['test_accuracy']:.4f}", f"{row['test_loss']:.4f}", f"{row['bytes_up'] / 1e6:.2f} MB",
                      f"{row['wall_s']:.1f} s", str(row["train.lr"]), row["tracking.kind"]):
            assert shown in line, (shown, line)
    header = next(x for x in lines if "train.lr" in x)
    assert "tracking.kind" in header and "model.name" not in header
    assert png_size(png) == (FIGSIZE[0] * DPI, FIGSIZE[1] * DPI)

    from PIL import Image  # decodes: a real image, not only a header

    with Image.open(png) as im:
        im.load()
        assert im.size == (1200, 450)


def test_unfinished_run_is_compared_from_metrics_jsonl(runs, tmp_path):
    killed = tmp_path / "killed"
    shutil.copytree(runs[0], killed)
    (killed / "summary.json").unlink()
    records = records_of(runs[0])
    # killed while writing round 2's line: a torn last line
    (killed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:2]) + '{"round": 2, "ve')
    c = compare_runs([str(runs[1]), str(killed)])
    row = c.rows[1]
    assert row["status"] == "unfinished" and row["rounds"] == 1
    assert row["test_accuracy"] == records[1]["test_accuracy"]
    assert (row["bytes_up"], row["wall_s"]) == (records[1]["bytes_up_total"], records[1]["wall_s"])
    result = CliRunner().invoke(app, ["compare", str(runs[1]), str(killed), "--png", str(tmp_path / "c.png"),
                                      "--metric", "loss"])
    assert result.exit_code == 0, result.output
    assert "unfinished" in next(x for x in result.output.splitlines() if " killed " in x)
    assert (tmp_path / "c.png").stat().st_size > 0


@pytest.mark.parametrize("case, message", [
    ("none", "needs at least one run folder"),
    ("missing", "run folder not found"),
    ("not_a_run", "is not a run folder (no config.yaml)"),
    ("no_metrics", "has no metrics yet"),
    ("bad_metric", "no run logged a metric 'f1'"),
])
def test_bad_input_is_one_line(runs, tmp_path, case, message):
    (tmp_path / "plain").mkdir()
    (tmp_path / "started").mkdir()
    shutil.copy(runs[0] / "config.yaml", tmp_path / "started" / "config.yaml")
    args = {"none": [], "missing": [str(tmp_path / "nope")], "not_a_run": [str(tmp_path / "plain")],
            "no_metrics": [str(tmp_path / "started")], "bad_metric": [str(runs[0]), "--metric", "f1"]}[case]
    result = CliRunner().invoke(app, ["compare", *args, "--png", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and message in result.output and one_line(result), result.output
    assert not (tmp_path / "x.png").exists()


# -- tracking --------------------------------------------------------------------------------------


def test_tensorboard_events_equal_metrics_jsonl(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = runs[1]
    ea = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    records = records_of(run)
    expected = {}
    for r in records:
        for key, value in scalars(r).items():
            expected.setdefault(key, []).append((r["round"], value))
    assert {"test_accuracy", "test_loss", "train_loss", "bytes_up_total", "per_client/0"} <= set(expected)
    assert set(ea.Tags()["scalars"]) == set(expected)
    for key, points in expected.items():
        logged = [(e.step, e.value) for e in ea.Scalars(key)]
        assert [s for s, _ in logged] == [s for s, _ in points], key
        for (_, got), (_, want) in zip(logged, points):
            assert got == pytest.approx(want, rel=1e-6, abs=1e-30), key  # stored as float32
    assert [e.step for e in ea.Scalars("test_accuracy")] == [0, 1, 2]
    text = ea.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "lr: 0.03" in text and "kind: tensorboard" in text  # the resolved config


def test_tensorboard_resume_purges_the_steps_run_again(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = TensorBoardTracker(tmp_path)
    for step in range(4):
        first.log_round({"round": step, "x": float(step)})
    first.close()
    second = TensorBoardTracker(tmp_path, purge_step=2)  # resumed from the checkpoint of round 1
    for step in (2, 3):
        second.log_round({"round": step, "x": 10.0 + step})
    second.close()
    ea = EventAccumulator(str(tmp_path))
    ea.Reload()
    assert [(e.step, e.value) for e in ea.Scalars("x")] == [(0, 0.0), (1, 1.0), (2, 12.0), (3, 13.0)]


def test_metrics_log_tracks_new_records_only():
    seen = []

    class Fake:
        def log_round(self, record):
            seen.append(record)

        def close(self):
            seen.append("closed")

    log = MetricsLog(None, kept=[{"round": 0, "a": 1.0}], tracker=Fake())
    log.write({"round": 1, "a": math.nan})
    log.close()
    assert [r["round"] for r in log.records] == [0, 1]
    assert seen == [{"round": 1, "a": None}, "closed"]  # kept records were tracked by the killed run


def test_scalars_flatten_numbers_and_skip_the_rest():
    record = {"round": 3, "test_accuracy": 0.5, "cohort": [1, 2], "stage_end": True, "train_loss": None,
              "bad": math.inf, "per_client": {"0": 1.0, "1": {"x": 2}}, "task": "sport", "version": 3}
    assert scalars(record) == {"test_accuracy": 0.5, "per_client/0": 1.0, "per_client/1/x": 2.0, "version": 3.0}


@pytest.mark.parametrize("kind, package", [("tensorboard", "tensorboard"), ("mlflow", "mlflow")])
def test_missing_package_is_a_one_line_install_hint_before_the_run(tmp_path, monkeypatch, kind, package):
    monkeypatch.setitem(sys.modules, package, None)  # import fails as if it were not installed
    with pytest.raises(FedfmError, match=rf"tracking.kind={kind} needs the '{package}' package.*pip install {package}"):
        check_tracking(load_config(None, [f"tracking={kind}"]))
    write_topic_csv(tmp_path / "topics.csv", n=90)
    result = CliRunner().invoke(app, ["run", *tiny(tmp_path, "run", tracking=kind)])
    assert result.exit_code == 2 and f"pip install {package}" in result.output and one_line(result), result.output
    assert not (tmp_path / "run").exists()  # refused before the folder was claimed, long before training


def test_mlflow_values_equal_metrics_jsonl(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    write_topic_csv(tmp_path / "topics.csv", n=90)
    fedfm.run(None, tiny(tmp_path, "run", tracking="mlflow"))
    run_dir = tmp_path / "run"
    client = MlflowClient(f"sqlite:///{run_dir / 'mlruns' / 'mlflow.db'}")
    (mlrun,) = client.search_runs([client.get_experiment_by_name("fedfm").experiment_id])
    assert mlrun.info.status == "FINISHED" and mlrun.info.run_name == "run"
    assert mlrun.data.tags["fedfm.run_id"] == json.loads((run_dir / "run.json").read_text())["run_id"]
    assert mlrun.data.params["federation.rounds"] == "2" and mlrun.data.params["tracking.kind"] == "mlflow"
    records = records_of(run_dir)
    for key in ("test_accuracy", "test_loss", "train_loss", "bytes_up_total", "per_client/1"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(mlrun.info.run_id, key))
        assert history == [(r["round"], pytest.approx(scalars(r)[key])) for r in records if key in scalars(r)], key
    config = client.download_artifacts(mlrun.info.run_id, "config.yaml", str(tmp_path))
    assert "kind: mlflow" in open(config).read()
