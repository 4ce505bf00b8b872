"""One registry per extension point: names, config classes and capabilities.

Every pluggable component (an aggregation algorithm, a robust rule, a codec,
a PEFT method, a partitioner, an attack, a client weighting) registers itself where it is
implemented, with a decorator next to its class or function::

    @ALGORITHMS.register("fedprox", config=FedProxOptions, capabilities={MERGEABLE, SECURE_SUM},
                         summary="FedProx (Li et al. 2020)")
    def _fedprox(cfg, num_clients): ...

An :class:`Entry` records the name, the registered object (a factory, a
class, a function: each registry documents what it expects), the pydantic
class of the entry's own config options (None when it has none), the
capabilities it supports and a one-line summary. Callers ask
``entry.supports(SECURE_SUM)`` instead of comparing names, and the config
schema takes its choices from :meth:`Registry.names`.

Discovery is lazy: a registry knows the packages that provide its entries
and, on the first lookup, imports every module in them (``pkgutil``), so a
new file dropped into ``fedfm/algorithms/`` registers itself with no other
edit, and the config layer validates names without importing the layers
above it. Third-party packages add entries through the entry-point group
``fedfm.<kind>`` (e.g. ``fedfm.algorithms``): each entry point names a
module (or an object in one) that registers on import.

This module is the bottom layer: it imports only the standard library,
pydantic and :mod:`fedfm.errors`; the registries of the upper layers are
created here so that any layer may read them.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from pydantic import BaseModel

from fedfm.errors import FedfmError

# -- capabilities -----------------------------------------------------------------------------------
# Algorithms (what their server fold and client side support)
MERGEABLE = "mergeable"  # the fold's partial()/merge(): worker processes fold shares, the sums are added
SECURE_SUM = "secure_sum"  # the fold's summand()/summand_layout()/absorb_sum(): it can run on a secure sum
ASYNC_SAFE = "async_safe"  # buffered asynchronous aggregation (staleness-scaled deltas) keeps its meaning
MEAN_DELTA = "mean_delta"  # the server step is a server-optimizer step on a weighted mean of the deltas
#                            alone (no extras, no per-update metrics): a robust rule or client-level DP
#                            may compute that mean instead and hand it over
PLAIN_CLIENT = "plain_client"  # no client hook: plain local training (batched clients can serve it)
DELTA_ONLY = "delta_only"  # an update carries no extra tensors besides its delta (HetLoRA can pad it)
SGD_SERVER_STEP = "sgd_server_step"  # the server step is FedAvg's x <- x + server_lr * mean delta, no
#                                      server state: FedAsync may mix models in its place

# Client weightings (the weight of an update in a fold's mean)
EXAMPLE_SCALED = "example_scaled"  # grows with the client's examples: a secure sum caps it at max_weight

# Robust aggregation rules
NEEDS_ALL_UPDATES = "needs_all_updates"  # buffers the round's updates (no secure sum, no worker split)
NEEDS_ROOT_DATA = "needs_root_data"  # the server trains on its own clean root dataset (FLTrust)

# Attacks
MODEL_POISONING = "model_poisoning"  # malicious clients rewrite the delta they send
COLLUDING = "colluding"  # the malicious delta is computed from the round's honest updates
POISONS_DATA = "poisons_data"  # malicious clients train on poisoned rows (set up before the first round)
FLIPS_LABELS = "flips_labels"  # poisoned rows carry flipped labels
TRIGGERS = "triggers"  # poisoned rows carry a backdoor trigger; backdoor success is evaluated
BOOSTS = "boosts"  # the delta is scaled by gamma = n / eta (model replacement)

# Codecs
LEADING = "leading"  # yields a float32 carrier of selected values: only first in a chain (top-k)
VALUE = "value"  # codes every value to a narrower type; at most one per chain
DOWNLOAD_SAFE = "download_safe"  # deterministic, lossless enough that all clients start from one state
STOCHASTIC = "stochastic"  # unbiased random rounding: needs a generator

# PEFT methods
PEFT = "peft"  # wrapped by peft.get_peft_model: the base is frozen, only the adapter trains
TARGETS_MODULES = "targets_modules"  # injects into model.<method>.target_modules
VIRTUAL_TOKENS = "virtual_tokens"  # prepends learned virtual tokens (prompt.num_virtual_tokens)
MERGES_INTO_BASE = "merges_into_base"  # the trained model can be merged into a new frozen base
RANKED = "ranked"  # has a rank that heterogeneous clients may shrink (HetLoRA)

# Partitioners
NEEDS_LABELS = "needs_labels"  # splits by label: unlabeled data cannot use it
NEEDS_GROUPS = "needs_groups"  # keeps a natural group (data.group_column) on one client


@dataclass(frozen=True)
class Entry:
    """One registered component: its name, the object to build it with, its options and capabilities."""

    name: str
    obj: Any
    config: type[BaseModel] | None = None
    capabilities: frozenset[str] = frozenset()
    summary: str = ""

    def supports(self, *capabilities: str) -> bool:
        """True when the entry has every one of ``capabilities``."""
        return all(c in self.capabilities for c in capabilities)

    def options(self, source: Any = None) -> BaseModel | None:
        """The entry's options validated from ``source`` (a mapping or an object with attributes).

        Keys the config class does not declare are ignored; missing ones take
        their defaults. None when the entry has no config class.
        """
        if self.config is None:
            return None
        fields = self.config.model_fields
        if source is None:
            given = {}
        elif isinstance(source, dict):
            given = {k: v for k, v in source.items() if k in fields}
        else:
            given = {k: getattr(source, k) for k in fields if hasattr(source, k)}
        return self.config.model_validate(given)


_ENTRY_POINTS: Any = None


def _entry_points(group: str) -> list:
    """The installed entry points of ``group`` (the metadata is read once per process)."""
    global _ENTRY_POINTS
    if _ENTRY_POINTS is None:
        _ENTRY_POINTS = importlib.metadata.entry_points()
    return list(_ENTRY_POINTS.select(group=group))


class Registry:
    """Name -> :class:`Entry` for one kind of component, filled by discovery on first use.

    ``packages`` are imported with every module inside them on the first
    lookup (a plain module is imported alone); ``group`` is the entry-point
    group of third-party entries (default ``fedfm.<kind>s``, spaces as underscores).
    """

    def __init__(self, kind: str, packages: str | Iterable[str], group: str | None = None) -> None:
        self.kind = kind
        self.packages = (packages,) if isinstance(packages, str) else tuple(packages)
        self.group = group or "fedfm." + kind.replace(" ", "_") + "s"
        self._entries: dict[str, Entry] = {}
        self._discovered = False
        self._discovering = False

    # -- registration ---------------------------------------------------------------------------
    def register(
        self,
        name: str,
        *,
        config: type[BaseModel] | None = None,
        capabilities: Iterable[str] = (),
        summary: str = "",
    ) -> Callable[[Any], Any]:
        """Decorator: register the decorated object under ``name``; returns it unchanged."""

        def deco(obj: Any) -> Any:
            self.add(name, obj, config=config, capabilities=capabilities, summary=summary)
            return obj

        return deco

    def add(
        self,
        name: str,
        obj: Any,
        *,
        config: type[BaseModel] | None = None,
        capabilities: Iterable[str] = (),
        summary: str = "",
    ) -> Entry:
        """Register ``obj`` under ``name``.

        Registering a name twice is an error unless it is the same object
        again (a module imported twice, e.g. reloaded).
        """
        if not name or not isinstance(name, str):
            raise ValueError(f"{self.kind} names must be non-empty strings, got {name!r}")
        if config is not None and not (isinstance(config, type) and issubclass(config, BaseModel)):
            raise TypeError(f"{self.kind} {name!r}: config must be a pydantic model class, got {config!r}")
        old = self._entries.get(name)
        if old is not None and _origin(old.obj) != _origin(obj):
            raise ValueError(f"{self.kind} {name!r} is registered twice ({_origin(old.obj)} and {_origin(obj)})")
        entry = Entry(name, obj, config, frozenset(capabilities), summary)
        self._entries[name] = entry
        return entry

    def remove(self, name: str) -> None:
        """Forget ``name`` (tests that register a temporary entry)."""
        self._entries.pop(name, None)

    # -- lookup ---------------------------------------------------------------------------------
    def discover(self) -> None:
        """Import every module of the registry's packages and its entry points (once)."""
        if self._discovered or self._discovering:
            return
        self._discovering = True
        try:
            for package in self.packages:
                module = importlib.import_module(package)
                for info in pkgutil.iter_modules(getattr(module, "__path__", []), package + "."):
                    importlib.import_module(info.name)
            for ep in _entry_points(self.group):
                ep.load()
            self._discovered = True
        finally:
            self._discovering = False

    def get(self, name: str) -> Entry:
        """The entry called ``name``; an unknown name is a one-line :class:`FedfmError`."""
        entry = self._entries.get(name)
        if entry is None:
            self.discover()
            entry = self._entries.get(name)
        if entry is None:
            raise FedfmError(f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names())}")
        return entry

    def names(self, *capabilities: str) -> list[str]:
        """Sorted names of the entries that support every one of ``capabilities``."""
        self.discover()
        return sorted(n for n, e in self._entries.items() if e.supports(*capabilities))

    def entries(self) -> list[Entry]:
        self.discover()
        return [self._entries[n] for n in sorted(self._entries)]

    def supports(self, name: str, *capabilities: str) -> bool:
        return self.get(name).supports(*capabilities)

    def option_owners(self, key: str) -> list[Entry]:
        """The entries whose config class declares the option ``key``."""
        return [e for e in self.entries() if e.config is not None and key in e.config.model_fields]

    def __contains__(self, name: object) -> bool:
        if isinstance(name, str) and name in self._entries:
            return True
        self.discover()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._entries)})"


def _origin(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


# -- the registries ----------------------------------------------------------------------------------
# Each algorithm factory is ``(cfg: AlgorithmConfig, num_clients: int) -> Algorithm``.
ALGORITHMS = Registry("algorithm", "fedfm.algorithms", "fedfm.algorithms")
# Each robust rule is a ``fedfm.robustness.aggregators.RobustRule`` subclass ("mean": the identity).
ROBUST_RULES = Registry("robust rule", "fedfm.robustness", "fedfm.robust_rules")
# Each codec factory is ``(opts) -> Codec`` with ``opts.topk_fraction`` and ``opts.chunk_size``.
CODECS = Registry("codec", "fedfm.compression", "fedfm.codecs")
# Each method is a ``fedfm.models.methods.Method`` subclass ("full": no peft wrapping).
METHODS = Registry("method", "fedfm.models", "fedfm.peft_methods")
# Each partitioner is ``(num_clients, num_examples, labels, groups, alpha, min_examples, rng) -> parts``.
PARTITIONERS = Registry("partition scheme", "fedfm.data", "fedfm.partitioners")
# Each weighting is ``(update: fedfm.algorithms.base.Update) -> float``, the update's weight in the fold's
# mean (0: skipped); ValueError for an update it cannot weigh (the server rejects it).
WEIGHTINGS = Registry("weighting", "fedfm.algorithms", "fedfm.weightings")
# Each attack is ``(attack: Attack, delta, benign_deltas, num_clients, num_byzantine, server_lr, generator) -> delta``.
ATTACKS = Registry("attack", "fedfm.robustness", "fedfm.attacks")
# model.quantize: how a frozen base is held (fedfm.models.quantize)
QUANTIZERS = Registry("quantization mode", "fedfm.models.quantize", "fedfm.quantizers")
