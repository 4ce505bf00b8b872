"""The registries (fedfm.registry): lookup errors, lazy discovery, entry points, capabilities, entry options."""

import sys
import textwrap

import pytest

import fedfm.algorithms
from fedfm.algorithms import build_algorithm
from fedfm.config import load_config
from fedfm.errors import ConfigError, FedfmError
from fedfm.registry import (
    ALGORITHMS,
    ATTACKS,
    CODECS,
    COLLUDING,
    DOWNLOAD_SAFE,
    LEADING,
    MEAN_DELTA,
    MERGEABLE,
    METHODS,
    NEEDS_ALL_UPDATES,
    NEEDS_LABELS,
    NEEDS_ROOT_DATA,
    PARTITIONERS,
    PEFT,
    POISONS_DATA,
    ROBUST_RULES,
    SECURE_SUM,
    VALUE,
    Registry,
)


def _package(tmp_path, monkeypatch, name: str, files: dict[str, str]) -> list[str]:
    """A throw-away package ``name`` on sys.path (unique names: nothing else imports them)."""
    root = tmp_path / name
    root.mkdir()
    for fname, text in files.items():
        (root / fname).write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path))
    return [name] + [f"{name}.{f[:-3]}" for f in files if f != "__init__.py"]


# -- the mechanism ----------------------------------------------------------------------------------
def test_unknown_name_is_one_line_listing_the_valid_names():
    reg = Registry("widget", [])
    reg.add("b", object())
    reg.add("a", object())
    with pytest.raises(FedfmError) as err:
        reg.get("c")
    assert str(err.value) == "unknown widget 'c'; valid names: a, b"
    with pytest.raises(FedfmError, match="unknown algorithm 'fedsgdx'; valid names: .*fedavg") as err:
        ALGORITHMS.get("fedsgdx")
    assert "\n" not in str(err.value)


def test_a_module_dropped_into_the_package_registers_itself_on_first_lookup(tmp_path, monkeypatch):
    modules = _package(tmp_path, monkeypatch, "widgetpkg", {
        "__init__.py": """
            from fedfm.registry import Registry
            WIDGETS = Registry("widget", __name__, group="fedfm.test_widgets")
        """,
        "shiny.py": """
            from widgetpkg import WIDGETS

            @WIDGETS.register("shiny", capabilities={"sparkles"}, summary="a shiny widget")
            def make():
                return "shiny!"
        """,
        "dull.py": """
            from widgetpkg import WIDGETS

            @WIDGETS.register("dull")
            def make():
                return "dull"
        """,
    })
    import widgetpkg

    assert "widgetpkg.shiny" not in sys.modules  # nothing imported before the first lookup
    entry = widgetpkg.WIDGETS.get("shiny")
    assert all(m in sys.modules for m in modules)
    assert entry.obj() == "shiny!" and entry.summary == "a shiny widget"
    assert entry.supports("sparkles") and not widgetpkg.WIDGETS.supports("dull", "sparkles")
    assert widgetpkg.WIDGETS.names() == ["dull", "shiny"] and list(widgetpkg.WIDGETS) == ["dull", "shiny"]
    assert widgetpkg.WIDGETS.names("sparkles") == ["shiny"]
    assert "dull" in widgetpkg.WIDGETS and "rusty" not in widgetpkg.WIDGETS


def test_third_party_entries_come_from_the_entry_point_group(monkeypatch):
    import fedfm.registry as registry

    reg = Registry("gadget", [])
    loaded = []

    class EntryPoint:  # importing a plugin module registers its entries
        def load(self):
            loaded.append(True)
            reg.add("external", "made elsewhere", capabilities={"shiny"})

    class EntryPoints:
        def select(self, group):
            return [EntryPoint()] if group == "fedfm.gadgets" else []

    monkeypatch.setattr(registry, "_ENTRY_POINTS", EntryPoints())
    assert reg.group == "fedfm.gadgets"
    assert reg.get("external").obj == "made elsewhere" and reg.names("shiny") == ["external"]
    reg.get("external")
    assert loaded == [True]  # discovery runs once


def test_registering_a_name_twice_is_an_error_unless_it_is_the_same_object():
    reg = Registry("widget", [])

    def one():
        pass

    def other():
        pass

    reg.add("w", one)
    reg.add("w", one)  # the same module imported again
    with pytest.raises(ValueError, match="registered twice"):
        reg.add("w", other)
    with pytest.raises(TypeError, match="pydantic"):
        reg.add("v", one, config=dict)


# -- the registries and their capabilities -------------------------------------------------------
def test_every_extension_point_has_its_registry_and_capabilities():
    builtin = {"fedavg", "fedprox", "scaffold", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "diloco"}
    assert builtin <= set(ALGORITHMS)
    assert "scaffold" not in ALGORITHMS.names(SECURE_SUM) and "fedprox" in ALGORITHMS.names(SECURE_SUM)
    assert "scaffold" not in ALGORITHMS.names(MEAN_DELTA) and ALGORITHMS.supports("scaffold", MERGEABLE)
    assert ALGORITHMS.get("fedprox").config.model_fields["mu"].default == 0.01
    assert set(ROBUST_RULES) == {"mean", "median", "trimmed_mean", "krum", "multi_krum", "bulyan", "norm_bound",
                                 "fltrust"}
    assert "mean" not in ROBUST_RULES.names(NEEDS_ALL_UPDATES)
    assert ROBUST_RULES.names(NEEDS_ROOT_DATA) == ["fltrust"]
    assert CODECS.names(LEADING) == ["topk"] and CODECS.names(DOWNLOAD_SAFE) == ["bf16", "fp16"]
    assert CODECS.names(VALUE) == ["bf16", "fp16", "int4", "int8"]
    assert set(METHODS) == {"full", "lora", "ia3", "prompt", "prefix"} and "full" not in METHODS.names(PEFT)
    assert set(PARTITIONERS) == {"iid", "dirichlet", "quantity", "natural"}
    assert PARTITIONERS.names(NEEDS_LABELS) == ["dirichlet"]
    assert ATTACKS.names(COLLUDING) == ["alie", "ipm"] and ATTACKS.names(POISONS_DATA) == ["backdoor", "label_flip"]


def test_a_built_algorithm_tells_its_capabilities():
    cfg = load_config(None, ["algorithm.name=scaffold"])
    algo = build_algorithm(cfg.algorithm, num_clients=4)
    assert algo.supports(MERGEABLE) and not algo.supports(SECURE_SUM)
    assert build_algorithm(load_config().algorithm, 4).supports(SECURE_SUM, MEAN_DELTA)


# -- entry options in the config ------------------------------------------------------------------------
def test_entry_options_keep_their_flat_keys_and_defaults():
    assert load_config(None, ["algorithm.name=fedprox"]).algorithm.mu == 0.01
    adam = load_config(None, ["algorithm.name=fedadam", "algorithm.tau=0.1"]).algorithm
    assert (adam.beta1, adam.beta2, adam.tau) == (0.9, 0.99, 0.1)
    assert load_config(None, ["robust.rule=trimmed_mean"]).robust.trim_fraction == 0.1
    assert load_config(None, ["robust.rule=fltrust"]).robust.root_examples == 100
    # another algorithm's option is validated and kept (a config written for diloco, run as fedavg)
    cfg = load_config(None, ["algorithm.name=fedavg", "algorithm.momentum=0.5"])
    assert cfg.algorithm.momentum == 0.5 and not hasattr(cfg.algorithm, "mu")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["algorithm.foo=1"], "invalid config: unknown key 'algorithm.foo'"),
        (["algorithm.name=fedprox", "algorithm.mu=-1"],
         "invalid config: 'algorithm.mu': Input should be greater than or equal to 0 (got -1)"),
        (["algorithm.momentum=1.5", "algorithm.zz=0"],
         "invalid config: 'algorithm.momentum': Input should be less than 1 (got 1.5); unknown key 'algorithm.zz'"),
        (["robust.rule=median", "robust.trim_fraction=0.7"],
         "invalid config: 'robust.trim_fraction': Input should be less than 0.5 (got 0.7)"),
        (["robust.rule=geomed"], "invalid config: 'robust.rule': Input should be 'bulyan', "),
        (["attack.name=backdoor", "attack.poison_fraction=2"],
         "invalid config: 'attack.poison_fraction': Input should be less than or equal to 1 (got 2)"),
    ],
)
def test_entry_option_errors_are_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_a_new_algorithm_file_brings_its_options_without_a_schema_edit(tmp_path, monkeypatch):
    """Drop a module into fedfm.algorithms' search path: name, options and factory are all it needs."""
    (tmp_path / "fedtest_algorithm.py").write_text(textwrap.dedent("""
        from pydantic import Field

        from fedfm.algorithms.base import AlgorithmOptions
        from fedfm.algorithms.fedavg import FEDAVG_CAPABILITIES, FedAvg
        from fedfm.algorithms.fedopt import ServerSGD
        from fedfm.registry import ALGORITHMS

        class FedTestOptions(AlgorithmOptions):
            gamma: float = Field(0.5, gt=0)
            server_lr: float = Field(0.25, gt=0)  # a shared option with this algorithm's own default

        @ALGORITHMS.register("fedtest", config=FedTestOptions, capabilities=FEDAVG_CAPABILITIES)
        def make(cfg, num_clients):
            return FedAvg(weighting=cfg.weighting, server_opt=ServerSGD(cfg.server_lr * cfg.gamma), name="fedtest")
    """))
    monkeypatch.setattr(fedfm.algorithms, "__path__", [*fedfm.algorithms.__path__, str(tmp_path)])
    monkeypatch.setattr(ALGORITHMS, "_discovered", False)
    monkeypatch.delitem(sys.modules, "fedfm.algorithms.fedtest_algorithm", raising=False)
    try:
        cfg = load_config(None, ["algorithm.name=fedtest", "algorithm.gamma=2"]).algorithm
        assert (cfg.gamma, cfg.server_lr) == (2.0, 0.25)
        assert build_algorithm(cfg, 3).fold.optimizer.lr == 0.5
        assert load_config(None, ["algorithm.name=fedtest"]).algorithm.gamma == 0.5
        with pytest.raises(ConfigError, match=r"^invalid config: 'algorithm.gamma': Input should be greater than 0"):
            load_config(None, ["algorithm.name=fedtest", "algorithm.gamma=0"])
        # its option is known to the registry, so a config naming another algorithm may keep it
        assert load_config(None, ["algorithm.gamma=3"]).algorithm.gamma == 3
    finally:
        ALGORITHMS.remove("fedtest")
        sys.modules.pop("fedfm.algorithms.fedtest_algorithm", None)
