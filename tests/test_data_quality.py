"""Client-side data quality (fedfm.data.quality) and the ``quality`` weighting: hand-computed references."""

from __future__ import annotations

import io
import itertools
import json
import random
from collections import OrderedDict

import numpy as np
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from fedfm.algorithms import FedAvg, Update
from fedfm.algorithms.fednova import FedNovaFold
from fedfm.build import build_clients, split_holdout
from fedfm.cli import app
from fedfm.compression.wire import Wire
from fedfm.config import load_config
from fedfm.config.schema import QualityConfig
from fedfm.data.quality import (
    MinHasher,
    QualityReport,
    clean_rows,
    jaccard,
    kept_fraction,
    loss_outliers,
    lsh_bands,
    near_duplicates,
    normalize,
    quality_metrics,
    report_problem,
    shingles,
    summary_line,
    with_loss_drops,
)
from fedfm.data.sources import load_text_dataset
from fedfm.runner import run
from fedfm.server.server import Server

from test_end_to_end import tiny_cls_overrides, write_topic_csv

pytestmark = pytest.mark.usefixtures("one_thread")


def opts(**kw) -> QualityConfig:
    return QualityConfig(enabled=True, **kw)


# -- static filters ---------------------------------------------------------------------------------
def test_exact_duplicates_of_the_normalized_text():
    texts = ["Hello  World", "hello world", "other text here", "Hello World!", "HELLO\tworld "]
    kept, rep = clean_rows(texts, None, opts(near_dup=False))
    # rows 1 and 4 normalize to "hello world" like row 0; "hello world!" keeps its "!" and differs
    assert kept.tolist() == [0, 2, 3]
    assert rep.rows == 5 and rep.kept == 3 and rep.dropped["duplicate"] == 2
    assert sum(rep.dropped.values()) == 2
    assert normalize("  A\u00a0B\n\nC ") == "a b c"  # NFKC turns the no-break space into a space


def test_near_duplicates_at_a_known_jaccard():
    a = "a b c d e f g h i j"
    b = "a b c d e f g h i k"
    # single words: {a..i} shared (9), union {a..k} (11): J = 9/11 = 0.818
    assert jaccard(shingles(a, 1), shingles(b, 1)) == pytest.approx(9 / 11)
    # 3-word shingles: 8 each, the first 7 shared, the union 9: J = 7/9 = 0.778
    assert jaccard(shingles(a, 3), shingles(b, 3)) == pytest.approx(7 / 9)
    texts = [a, "completely different words in this row", b]
    for size, threshold, dropped in [(1, 0.80, True), (1, 0.85, False), (3, 0.75, True), (3, 0.80, False)]:
        kept, rep = clean_rows(texts, None, opts(dedup=False, shingle_size=size, near_dup_threshold=threshold))
        assert rep.dropped["near_duplicate"] == int(dropped), (size, threshold)
        assert kept.tolist() == ([0, 1] if dropped else [0, 1, 2])


def test_minhash_estimates_jaccard_and_banding_recall():
    s1 = frozenset(f"w{i}" for i in range(100))
    s2 = frozenset(f"w{i}" for i in range(50, 150))  # |∩| = 50, |∪| = 150: J = 1/3
    h = MinHasher(num_perm=1024, seed=1)
    est = float((h.signature(s1) == h.signature(s2)).mean())
    assert abs(est - 1 / 3) < 0.05  # std of the estimate: sqrt(J(1-J)/1024) = 0.015
    assert (h.signature(s1) == h.signature(s1)).all()
    bands, rows = lsh_bands(128, 0.8)
    assert bands * rows <= 128 and 1 - (1 - 0.8**rows) ** bands >= 0.99
    assert 1 - (1 - 0.8 ** (rows + 1)) ** (128 // (rows + 1)) < 0.99  # the most rows per band that keeps recall


def test_near_duplicates_match_brute_force():
    rng = random.Random(3)
    vocab = [f"v{i}" for i in range(40)]
    texts = []
    for _ in range(40):
        words = rng.choices(vocab, k=12)
        texts.append(words)
        if rng.random() < 0.5:  # a near copy: one or two words changed
            copy = list(words)
            for _ in range(rng.randint(1, 2)):
                copy[rng.randrange(12)] = rng.choice(vocab)
            texts.append(copy)
    sets = [shingles(" ".join(t), 2) for t in texts]
    got = near_duplicates(sets, 0.6, num_perm=128, seed=0)
    want, kept = [], []  # greedy in order: drop a row similar to an earlier kept one
    for i, s in enumerate(sets):
        dup = any(jaccard(s, sets[j]) >= 0.6 for j in kept)
        want.append(dup)
        if not dup:
            kept.append(i)
    assert got.tolist() == want and sum(want) > 5


def test_empty_short_and_long_rows():
    texts = ["", "   ", "hi", "a fine sentence of words", "x" * 50, "two words", "?! ...", "\u200b"]
    kept, rep = clean_rows(texts, None, opts(min_chars=3, max_chars=30))
    assert kept.tolist() == [3, 5]  # no letter or digit: empty (rows 0, 1, 6, 7); "hi" < 3 chars; 50 > 30
    assert (rep.dropped["empty"], rep.dropped["short"], rep.dropped["long"]) == (4, 1, 1)
    kept, rep = clean_rows(texts, None, opts(min_words=3, max_words=4))  # "a fine sentence of words" has 5
    assert kept.tolist() == [] and rep.dropped["short"] == 3 and rep.dropped["long"] == 1


def test_missing_or_invalid_labels():
    names = ["business", "nan", "sport"]  # "nan": what a blank cell of a numeric label column becomes
    texts = [f"row number {i} of text" for i in range(5)]
    labels = [0, 1, 2, -1, 5]
    kept, rep = clean_rows(texts, labels, opts(), label_names=names)
    assert kept.tolist() == [0, 2] and rep.dropped["label"] == 3
    kept, rep = clean_rows(texts, labels, opts(allowed_labels=["Business"]), label_names=names)
    assert kept.tolist() == [0] and rep.dropped["label"] == 4
    kept, _ = clean_rows(texts, labels, opts(labels=False), label_names=names)
    assert kept.tolist() == [0, 1, 2, 3, 4]


def test_loss_outliers_above_median_plus_k_mad():
    # median 3; |x - 3| = [2, 1, 0, 1, 97], MAD = 1: threshold 3 + 3*1 = 6
    assert loss_outliers([1, 2, 3, 4, 100], 3.0).tolist() == [False, False, False, False, True]
    # k = 0.5: threshold 3.5, so 4 goes as well
    assert loss_outliers([1, 2, 3, 4, 100], 0.5).tolist() == [False, False, False, True, True]
    assert not loss_outliers([1, 1, 1, 5], 3.0).any()  # MAD 0: no spread, nothing dropped
    # an absolute bound as well: 4 > 3.5; and it still holds when the MAD rule has no spread
    assert loss_outliers([1, 2, 3, 4, 100], 3.0, max_loss=3.5).tolist() == [False, False, False, True, True]
    assert loss_outliers([1, 1, 1, 5], 3.0, max_loss=2.0).tolist() == [False, False, False, True]
    # half the rows bad: the median sits between the clusters and the MAD rule keeps them all
    assert not loss_outliers([0.1, 0.1, 0.2, 3.0, 3.1, 3.2], 3.0).any()
    assert loss_outliers([1.0, float("nan"), 2.0, 3.0], 3.0).tolist() == [False, True, False, False]
    # k=None: the MAD rule is off, only the absolute bound (and non-finite losses) remain
    assert loss_outliers([1, 2, 3, 4, 100], None).tolist() == [False] * 5
    assert loss_outliers([1, 2, 3, 4, 100], None, max_loss=3.5).tolist() == [False, False, False, True, True]
    assert loss_outliers([1.0, float("inf"), 2.0], None).tolist() == [False, True, False]


def test_config_bounds_and_one_line_cli_errors(tmp_path):
    assert load_config().data.quality.enabled is False  # off by default
    with pytest.raises(Exception, match="max_chars=2 is below min_chars=5"):
        load_config(None, ["data.quality.min_chars=5", "data.quality.max_chars=2"])
    runner = CliRunner()
    res = runner.invoke(app, ["run", "data.quality.dedupp=true", f"out={tmp_path / 'a'}"])
    assert res.exit_code != 0
    assert res.output.strip().count("\n") == 0 and "unknown key 'data.quality.dedupp'" in res.output
    res = runner.invoke(app, ["run", "algorithm.weighting=quality", f"out={tmp_path / 'b'}"])
    assert res.exit_code != 0
    assert res.output.strip().count("\n") == 0 and "needs data.quality.enabled=true" in res.output
    res = runner.invoke(app, ["run", "algorithm.weighting=best", f"out={tmp_path / 'c'}"])
    assert res.exit_code != 0 and "'examples', 'quality' or 'uniform'" in res.output


# -- the reported counts, the server's check and the weighting ----------------------------------------
def report(rows: int, kept: int, **dropped) -> dict:
    counts = {r: 0 for r in QualityReport(0, 0).dropped}
    counts.update(dropped)
    return quality_metrics(QualityReport(rows, kept, counts))


def test_report_checks():
    assert report_problem({"train_loss": 1.0}, 5) is None  # no report: nothing to check
    assert report_problem(report(10, 7, duplicate=3), 7) is None
    assert "keeps 11 of 10" in report_problem(report(10, 11), 11)
    assert "do not add up" in report_problem(report(10, 7, duplicate=2), 7)
    assert "claims 9 examples" in report_problem(report(10, 7, duplicate=3), 9)
    assert "non-negative integer" in report_problem(report(10, 7, duplicate=2.5, empty=0.5), 7)
    assert kept_fraction(report(8, 6, empty=2), 0) == 0.75
    with pytest.raises(ValueError, match="needs the update's data-quality counts"):
        kept_fraction({}, 3)
    loss = with_loss_drops(QualityReport(10, 8, {"duplicate": 2}), 3)
    assert (loss.kept, loss.dropped["loss"], loss.dropped["duplicate"]) == (5, 3, 2)
    table = {"kept": 1234, "dropped": {"duplicate": 40, "empty": 10, "label": 6, "loss": 0}}
    assert summary_line(table) == "data quality: 1234 rows kept, 56 dropped (duplicate 40, empty 10, label 6)"


def test_quality_weighting_is_a_hand_computed_weighted_mean():
    g = OrderedDict(w=torch.tensor([0.0, 0.0]))
    ups = [  # weights: 2 x 2/4 = 1 and 3 x 3/3 = 3: (1 x [1, 2] + 3 x [4, 8]) / 4 = [13/4, 26/4]
        Update(0, OrderedDict(w=torch.tensor([1.0, 2.0])), 2, metrics=report(4, 2, duplicate=2)),
        Update(1, OrderedDict(w=torch.tensor([4.0, 8.0])), 3, metrics=report(3, 3)),
    ]
    algo = FedAvg(weighting="quality")
    algo.start(g, 0)
    for u in ups:
        algo.add(u)
    assert torch.allclose(algo.finish()["w"], torch.tensor([3.25, 6.5]))
    # examples weighting of the same updates: (2 x [1, 2] + 3 x [4, 8]) / 5 = [2.8, 5.6]
    algo = FedAvg(weighting="examples")
    algo.start(g, 0)
    for u in ups:
        algo.add(u)
    assert torch.allclose(algo.finish()["w"], torch.tensor([2.8, 5.6]))
    fold = FedNovaFold(weighting="quality")  # FedNova takes the same weights (equal steps: FedAvg's mean)
    fold.start(g, 0)
    for u in ups:
        u.metrics["steps"] = 4.0
        fold.add(u)
    assert torch.allclose(fold.finish()["w"], torch.tensor([3.25, 6.5]))
    algo = FedAvg(weighting="quality")
    algo.start(g, 0)
    with pytest.raises(ValueError, match="data-quality counts"):
        algo.add(Update(2, OrderedDict(w=torch.ones(2)), 3))


def test_server_rejects_implausible_counts_and_keeps_the_latest_report():
    s = Server(FedAvg(weighting="quality"), OrderedDict(w=torch.zeros(2)))
    wire = Wire()

    def send(cid, examples, metrics):
        u = Update(cid, OrderedDict(w=torch.ones(2)), examples, metrics={"train_loss": 1.0, **metrics})
        return s.receive(wire.encode_update(u, {}, 0), cid)

    s.open_round(1, [0, 1, 2, 3])
    assert send(0, 6, report(8, 6, empty=2))
    assert not send(1, 9, report(8, 9))  # keeps more rows than it has
    assert not send(2, 5, report(8, 6, empty=2))  # trains on other rows than it kept
    assert not send(3, 5, {})  # quality weighting without a report: the fold refuses it
    record = s.close_round()
    assert record["rejected_by_reason"] == {"fold": 1, "quality": 2}
    assert s.quality == {0: {"rows": 8, "kept": 6, "dropped": {**{r: 0 for r in QualityReport(0, 0).dropped},
                                                               "empty": 2}}}


# -- one tiny run: the counts reach partition.json, summary.json and the console ------------------------
def messy_csv(path):
    """The tiny topic CSV plus 40 exact copies of its rows and 12 texts without a letter or digit."""
    write_topic_csv(path, n=300)
    lines = path.read_text().splitlines()
    rng = random.Random(5)
    extra = [rng.choice(lines[1:]) for _ in range(40)] + ["...,sport"] * 6 + ["\u200b!?,tech"] * 6
    path.write_text("\n".join(lines + extra) + "\n")
    return path


def test_tiny_run_reports_counts_end_to_end(tmp_path):
    data = messy_csv(tmp_path / "messy.csv")
    over = tiny_cls_overrides(tmp_path, **{
        "data.dataset": str(data), "data.quality.enabled": "true", "data.quality.near_dup": "false",
        "data.quality.loss_filter": "true", "algorithm.weighting": "quality", "federation.rounds": 2,
        "eval.every": 0, "train.local_steps": 2, "progress": "true"})
    buf = io.StringIO()
    summary = run(None, over, console=Console(file=buf, width=200))
    out = tmp_path / "run"
    part = json.loads((out / "partition.json").read_text())["data_quality"]

    # reference: the same clients, their duplicates and empty rows counted with plain Python sets
    cfg = load_config(out / "config.yaml")
    ds = load_text_dataset(cfg.data, cfg.model.task, seed=cfg.seed)
    _, clients, _ = build_clients(cfg, ds, split_holdout(cfg, ds))
    for c, row in zip(clients, part["clients"]):
        texts = [ds.texts[i] for i in c.train_idx]
        nonempty = [t for t in texts if any(ch.isalnum() for ch in t)]
        assert row["rows"] == len(texts)
        assert row["dropped"]["empty"] == len(texts) - len(nonempty)
        assert row["dropped"]["duplicate"] == len(nonempty) - len(set(nonempty))
        assert row["kept"] == len(set(nonempty))
    assert part["dropped"]["empty"] > 0 and part["dropped"]["duplicate"] > 0
    assert part["rows"] == part["kept"] + sum(part["dropped"].values())

    text = buf.getvalue()
    dropped = part["dropped"]["duplicate"] + part["dropped"]["empty"]
    assert f"data quality: {part['kept']} rows kept, {dropped} dropped (" in text

    reported = summary["data_quality"]  # the latest counts each participating client reported
    assert summary["rejected_updates"] == 0 and reported["clients"]
    static = {r["client"]: r for r in part["clients"]}
    for row in reported["clients"]:
        mine = static[row["client"]]
        assert row["rows"] == mine["rows"]
        assert row["kept"] == mine["kept"] - row["dropped"]["loss"]
        for reason in ("empty", "duplicate", "near_duplicate", "label"):
            assert row["dropped"][reason] == mine["dropped"][reason]
    assert json.loads((out / "summary.json").read_text())["data_quality"] == reported


def test_refused_combinations(tmp_path):
    from fedfm.build import check_quality
    from fedfm.errors import FedfmError

    for extra, fragment in [
        (["continual.enabled=true"], "continual"),
        (["attack.name=label_flip", "attack.fraction=0.2"], "attack.name=label_flip"),
        (["data.quality.loss_filter=true", "personalization.method=fedper"], "personalization"),
        (["data.quality.loss_filter=true", "train.batch_clients=2"], "train.batch_clients=2"),
        (["algorithm.weighting=quality", "robust.rule=median"], "robust.rule=median"),
        (["algorithm.weighting=quality", "privacy.client_dp.enabled=true", "privacy.client_dp.noise_multiplier=1"],
         "privacy.client_dp"),
    ]:
        with pytest.raises(FedfmError, match=fragment):
            check_quality(load_config(None, ["data.quality.enabled=true", *extra]))
    check_quality(load_config(None, ["data.quality.enabled=true", "algorithm.weighting=quality"]))


def test_static_filters_keep_order_and_positions():
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(list("abcdefgh"), size=6)) for _ in range(30)]
    texts += texts[:5]
    kept, rep = clean_rows(texts, None, opts(near_dup=False))
    assert list(kept) == sorted(kept) and len(set(texts[i] for i in kept)) == len(kept)
    assert rep.kept == len(kept) == len(set(texts))
    assert all(a < b for a, b in itertools.pairwise(kept))


@pytest.fixture
def flower_identity():
    """Flower stamps messages with the run and node of the process (as in test_deploy_driver)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None


def test_deployed_nodes_filter_their_own_rows(tmp_path, flower_identity):
    import yaml

    from fedfm.config import to_dict
    from fedfm.deploy.serve import build_server_run
    from test_deploy_driver import LoopbackGrid, honest, setup_with_overrides

    cfg, workers, _ = setup_with_overrides(tmp_path, {
        "federation.num_clients": 3, "federation.clients_per_round": 3, "data.quality.enabled": True,
        "data.quality.loss_filter": True, "data.quality.loss_start_version": 0, "algorithm.weighting": "quality"})
    node0 = workers[100].data_path
    lines = node0.read_text().splitlines()
    node0.write_text("\n".join(lines + [lines[1]] * 8) + "\n")  # 8 more copies of one row on node 0
    grid = LoopbackGrid(honest(workers, yaml.safe_dump(to_dict(cfg))), workers)
    r = build_server_run(cfg, grid)
    r.sim.join(3, 10)
    record = r.sim.run_round(1)
    assert record["accepted"] == 3 and not r.server.rejected
    assert sorted(r.server.quality) == [0, 1, 2]
    for q in r.server.quality.values():
        assert q["rows"] == q["kept"] + sum(q["dropped"].values())
    assert r.server.quality[r.sim.cid_of_name["client-000"]]["dropped"]["duplicate"] >= 5
