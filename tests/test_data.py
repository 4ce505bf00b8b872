"""Data layer: sources, partitions, splits and partition stats."""

import json
import re

import numpy as np
import pytest

from fedfm.config.schema import DataConfig
from fedfm.data import (
    format_partition_stats,
    load_text_dataset,
    partition,
    partition_stats,
    split_client,
    train_test_split,
)
from fedfm.data.sources import parse_play
from fedfm.errors import FedfmError

N, C, K = 1000, 5, 20
LABELS = np.arange(N) % C  # balanced, 200 per class


def covers_exactly_once(parts, n):
    return np.array_equal(np.sort(np.concatenate(parts)), np.arange(n))


def skew(parts, labels=LABELS):
    return partition_stats(parts, labels, C)["label_skew_tv"]


# ----------------------------------------------------------------------------- partition


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "quantity", "natural"])
def test_every_example_assigned_exactly_once(scheme):
    groups = [f"g{i % 37}" for i in range(N)]
    parts = partition(
        K, scheme, num_examples=N, labels=LABELS, groups=groups, alpha=0.3, min_examples=2, seed=1
    )
    assert len(parts) == K
    assert covers_exactly_once(parts, N)
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)  # sorted, no duplicates
    assert min(len(p) for p in parts) >= 2


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "quantity"])
def test_deterministic_per_seed_and_varies_across_seeds(scheme):
    def run(seed):
        return partition(K, scheme, num_examples=N, labels=LABELS, alpha=0.5, seed=seed)

    a, b, c = run(3), run(3), run(4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_iid_sizes_differ_by_at_most_one():
    sizes = [len(p) for p in partition(7, "iid", num_examples=100, seed=0)]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 100


def test_dirichlet_label_skew_is_measurable():
    iid = skew(partition(K, "iid", num_examples=N, seed=0))
    strong = skew(partition(K, "dirichlet", num_examples=N, labels=LABELS, alpha=0.1, seed=0))
    weak = skew(partition(K, "dirichlet", num_examples=N, labels=LABELS, alpha=100.0, seed=0))
    assert iid < 0.2
    assert strong > 0.5
    assert weak < 0.2
    parts = partition(K, "dirichlet", num_examples=N, labels=LABELS, alpha=0.1, seed=0)
    stats = partition_stats(parts, LABELS, C)
    assert stats["classes_per_client"] < 3.5  # alpha=0.1: few classes per client


def test_dirichlet_reaches_min_examples_even_with_tiny_alpha():
    labels = np.arange(500) % 5
    parts = partition(100, "dirichlet", num_examples=500, labels=labels, alpha=0.05, min_examples=3, seed=0)
    assert covers_exactly_once(parts, 500)
    assert min(len(p) for p in parts) >= 3
    assert skew(parts, labels) > 0.4  # topping up the smallest clients keeps the skew


def test_quantity_skew_spreads_sizes_but_not_labels():
    iid = partition_stats(partition(K, "iid", num_examples=N, seed=0), LABELS, C)
    parts = partition(K, "quantity", num_examples=N, alpha=0.3, min_examples=2, seed=0)
    qty = partition_stats(parts, LABELS, C)
    assert iid["size_std"] <= 0.5
    assert qty["size_std"] > 20
    assert qty["size_min"] >= 2


def test_natural_keeps_groups_whole():
    rng = np.random.default_rng(0)
    groups = [f"user{u}" for u in rng.integers(0, 40, size=N)]
    parts = partition(10, "natural", num_examples=N, groups=groups)
    owner = {}
    for client, part in enumerate(parts):
        for i in part:
            assert owner.setdefault(groups[i], client) == client
    assert len(set(owner.values())) == 10
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) < N / 10  # largest-first greedy balances sizes


def test_natural_one_group_per_client_in_name_order():
    groups = ["b", "a", "c", "a", "b", "c"]
    parts = partition(3, "natural", num_examples=6, groups=groups)
    assert [p.tolist() for p in parts] == [[1, 3], [0, 4], [2, 5]]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_clients=50, scheme="iid", num_examples=30), "num_clients=50.*30"),
        (dict(num_clients=10, scheme="iid", num_examples=30, min_examples=4), "min_examples=4"),
        (dict(num_clients=2, scheme="dirichlet", num_examples=30), "needs labels"),
        (dict(num_clients=2, scheme="natural", num_examples=30), "group"),
        (dict(num_clients=5, scheme="natural", num_examples=4 * 5, groups=list("abcd") * 5), "4"),
        (dict(num_clients=2, scheme="shards", num_examples=30), "unknown partition scheme 'shards'"),
    ],
)
def test_partition_errors(kwargs, match):
    with pytest.raises(FedfmError, match=match):
        partition(**kwargs)


# ----------------------------------------------------------------------------- splits


def test_train_test_split_stratified_and_disjoint():
    labels = np.array([0] * 80 + [1] * 20)
    train, test = train_test_split(100, 0.25, labels=labels, seed=0)
    assert len(test) == 25 and len(train) == 75
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(100))
    assert np.bincount(labels[test]).tolist() == [20, 5]
    t2, _ = train_test_split(100, 0.25, labels=labels, seed=1)
    assert not np.array_equal(train, t2)
    assert len(train_test_split(10, 0.0)[1]) == 0


def test_split_client_sizes():
    idx = np.array([5, 9, 11, 40, 41, 77, 80, 90, 91, 99])
    train, test = split_client(idx, 0.2, seed=0)
    assert len(test) == 2 and len(train) == 8
    assert sorted(np.concatenate([train, test]).tolist()) == idx.tolist()
    assert [len(x) for x in split_client(idx[:2], 0.1, seed=0)] == [1, 1]  # at least one test example
    assert [len(x) for x in split_client(idx[:2], 0.9, seed=0)] == [1, 1]  # train keeps one
    assert [len(x) for x in split_client(idx[:1], 0.5, seed=0)] == [1, 0]
    assert [len(x) for x in split_client(idx, 0.0, seed=0)] == [10, 0]


# ----------------------------------------------------------------------------- stats


def test_stats_hand_computed_skew():
    labels = np.array([0, 0, 1, 1, 2, 2])  # global distribution (1/3, 1/3, 1/3)
    parts = [np.array([0, 1]), np.array([2, 3, 4, 5])]
    s = partition_stats(parts, labels, 3)
    # client 0: (1, 0, 0) -> TV 2/3; client 1: (0, 1/2, 1/2) -> TV 1/3; mean 1/2
    assert s["label_skew_tv"] == pytest.approx(0.5)
    assert s["label_hist"] == [[2, 0, 0], [0, 2, 2]]
    assert s["classes_per_client"] == pytest.approx(1.5)
    assert s["sizes"] == [2, 4] and s["size_std"] == pytest.approx(1.0)
    json.dumps(s)
    text = format_partition_stats(s)
    assert "2 clients" in text and "0.500" in text
    assert "label_skew_tv" not in partition_stats(parts, None, None)


# ----------------------------------------------------------------------------- sources


def test_bbc_news_builtin():
    data = load_text_dataset(DataConfig(dataset="bbc_news"), "seq_cls")
    assert len(data.texts) == 2225
    assert data.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert data.labels.dtype == np.int64
    assert np.bincount(data.labels).tolist() == [510, 386, 417, 511, 401]
    assert data.groups is None and all(t.strip() for t in data.texts)


def test_max_examples_is_seeded_and_keeps_order():
    cfg = DataConfig(dataset="bbc_news", max_examples=100)
    a = load_text_dataset(cfg, "seq_cls", seed=0)
    b = load_text_dataset(cfg, "seq_cls", seed=0)
    c = load_text_dataset(cfg, "seq_cls", seed=1)
    assert len(a.texts) == 100 and a.texts == b.texts and a.texts != c.texts
    assert np.all(np.diff(a.labels) >= 0)  # bbc is stored topic by topic: order kept
    assert a.label_names == b.label_names and len(a.label_names) == 5


def test_shakespeare_by_role():
    data = load_text_dataset(DataConfig(dataset="shakespeare", min_lines_per_role=8), "causal_lm")
    assert data.labels is None and data.label_names is None
    assert len(data.texts) > 20000
    roles = set(data.groups)
    assert len(roles) > 300
    assert "hamlet_gut:Ham" in roles and "hamlet_gut:Hor" in roles
    assert all(re.fullmatch(r"[a-z0-9_]+_gut:\S.*", g) for g in roles)
    assert not any(g.split(":")[0].endswith("_gut_f") for g in roles)
    # no speech is a bare role name (a speaker line taken as text), a heading or a stage direction
    same_play_bare = sum(
        1 for t, g in zip(data.texts, data.groups) if f"{g.split(':')[0]}:{t.rstrip('.')}" in roles
    )
    assert same_play_bare < 0.001 * len(data.texts)  # a few real one-word speeches ("Romeo.")
    hamlet_roles = {g.split(":")[1] for g in roles if g.startswith("hamlet_gut:")}
    for text, group in zip(data.texts, data.groups):
        assert text.strip()
        assert not text.startswith(("ACT ", "Scene ", "SCENE ", "[")) and "]" not in text
        if group.startswith("hamlet_gut:"):
            assert not any(line.rstrip(".") in hamlet_roles for line in text.split("\n")), text
    # the dramatis personae is not parsed as speech
    assert not any("Nephew to the present King" in t for t in data.texts)
    counts = {g: data.groups.count(g) for g in ("hamlet_gut:Ham", "hamlet_gut:Hor")}
    assert counts["hamlet_gut:Ham"] > 300 and counts["hamlet_gut:Hor"] > 80

    top = load_text_dataset(DataConfig(dataset="shakespeare", max_roles=5), "causal_lm")
    assert len(set(top.groups)) == 5 and "hamlet_gut:Ham" in top.groups

    with pytest.raises(FedfmError, match="no labels"):
        load_text_dataset(DataConfig(dataset="shakespeare"), "seq_cls")


def test_parse_play_speeches():
    play = "\n".join(
        [
            "THE TITLE", "", "PERSONS.", "", "A Priest.", "Ophelia, Daughter.", "",  # before ACT: ignored
            "ACT I.", "", "Scene I. A platform.", "", "[Enter Bernardo.]", "",
            "Ber.", "Who's there?", "", "Fran.", "Nay, answer me:", "[Aside.] stand.", "",
            "[Exit Bernardo.]", "", "And unfold yourself.", "", "Ber.", "", "Long live the king!", "",
        ]
    )
    assert parse_play(play) == [
        ("Ber", "Who's there?"),
        ("Fran", "Nay, answer me:\nstand.\nAnd unfold yourself."),
        ("Ber", "Long live the king!"),
    ]


def write_csv(path, rows, header):
    path.write_text("\n".join([",".join(header)] + [",".join(map(str, r)) for r in rows]) + "\n")


def test_local_csv_and_jsonl_with_string_labels(tmp_path):
    csv = tmp_path / "d.csv"
    rows = [("good film", "pos", "u1"), ("bad film", "neg", "u2"), ("fine", "pos", "u1")]
    write_csv(csv, rows, ["text", "label", "user"])
    data = load_text_dataset(DataConfig(dataset=str(csv), group_column="user"), "seq_cls")
    assert data.texts == ["good film", "bad film", "fine"]
    assert data.label_names == ["neg", "pos"] and data.labels.tolist() == [1, 0, 1]
    assert data.groups == ["u1", "u2", "u1"]

    jsonl = tmp_path / "d.jsonl"
    rows = [{"body": "a", "topic": "z"}, {"body": "", "topic": "y"}, {"body": "c", "topic": "x"}]
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = DataConfig(dataset=str(jsonl), text_column="body", label_column="topic")
    data = load_text_dataset(cfg, "seq_cls")
    assert data.texts == ["a", "c"]  # the empty text is dropped
    assert data.label_names == ["x", "y", "z"] and data.labels.tolist() == [2, 0]


def test_local_integer_labels_are_remapped(tmp_path):
    csv = tmp_path / "ints.csv"
    write_csv(csv, [("a", 10), ("b", 3), ("c", 10), ("d", 7)], ["text", "label"])
    data = load_text_dataset(DataConfig(dataset=str(csv)), "seq_cls")
    assert data.label_names == ["3", "7", "10"] and data.labels.tolist() == [2, 0, 2, 1]


def test_source_errors(tmp_path):
    csv = tmp_path / "d.csv"
    write_csv(csv, [("x", "a")], ["sentence", "label"])
    with pytest.raises(FedfmError, match=r"text column 'text'.*\['sentence', 'label'\]"):
        load_text_dataset(DataConfig(dataset=str(csv)), "seq_cls")
    cfg = DataConfig(dataset=str(csv), text_column="sentence", label_column="y")
    with pytest.raises(FedfmError, match=r"label column 'y'.*sentence"):
        load_text_dataset(cfg, "seq_cls")
    # causal LM does not need the label column
    assert load_text_dataset(cfg, "causal_lm").labels is None
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FedfmError, match=f"data file not found: {re.escape(str(missing))}"):
        load_text_dataset(DataConfig(dataset=str(missing)), "seq_cls")
    with pytest.raises(FedfmError, match="unknown dataset 'imdb'.*bbc_news, shakespeare"):
        load_text_dataset(DataConfig(dataset="imdb"), "seq_cls")
