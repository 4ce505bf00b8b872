import pytest

from fedfm.config import load_config
from fedfm.errors import ConfigError


def test_default_job_is_the_documented_one():
    cfg = load_config()
    assert (cfg.model.name, cfg.model.method, cfg.model.task) == ("minilm", "lora", "seq_cls")
    assert cfg.data.dataset == "bbc_news"
    assert cfg.federation.num_clients == 20
    assert cfg.federation.partition.scheme == "dirichlet" and cfg.federation.partition.alpha == 0.5
    assert cfg.federation.clients_per_round < cfg.federation.num_clients


def test_examples_default_yaml_equals_embedded_default():
    assert load_config("examples/default.yaml") == load_config()


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["train.lr=1e-4", "federation.rounds=3", "model.lora.target_modules=[query, key]", "out=x"])
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.federation.rounds == 3
    assert cfg.model.lora.target_modules == ["query", "key"]
    assert cfg.out == "x"


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.lrr=1", "unknown key 'train.lrr'"),
        ("train.lr=abc", "'train.lr'"),
        ("model.method=bitfit", "'model.method'"),
        ("algorithm.name=fedsgdx", "'algorithm.name'"),
        ("federation.clients_per_round=50", "exceeds num_clients=20"),
        ("noequals", "key=value"),
    ],
)
def test_bad_overrides_give_one_line_errors(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    msg = str(err.value)
    assert fragment in msg
    assert "\n" not in msg


def test_epochs_replace_default_steps_but_not_both():
    assert load_config(None, ["train.local_epochs=2"]).train.local_steps is None
    with pytest.raises(ConfigError, match="only one"):
        load_config(None, ["train.local_epochs=2", "train.local_steps=3"])


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
