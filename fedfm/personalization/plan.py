"""Which tensors of the trainable state stay on the client, and each client's personalized model.

The trainable state splits into **shared** tensors, which travel and are
aggregated as usual, and **personal** tensors, which live in the client's
private ``Client.state`` and are never sent:

* ``fedper`` / ``fedrep``: the personal tensors are the task head by default
  (``personalization.personal`` names others: adapter tensors, say);
* ``ditto``: everything is shared (the global model trains as in FedAvg), and
  each client also keeps a private copy ``v_k`` of the whole trainable state;
* ``local``: everything is personal, nothing is shared or aggregated.

The global state a run keeps, broadcasts, receives, validates and folds holds
only the shared tensors, so the wire, the byte ledger and every server fold
see exactly what leaves a client. A client's personal tensors start from the
initial model's values the first time it trains (Ditto's ``v_k`` starts from
the global model the client first receives: the initial model in round 1).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Mapping, Sequence

import torch

from fedfm.errors import FedfmError
from fedfm.models.registry import head_modules
from fedfm.registry import (ALGORITHMS, ATTACKS, MODEL_POISONING, NEEDS_ALL_UPDATES, PLAIN_CLIENT, POISONS_DATA,
                            ROBUST_RULES, SGD_SERVER_STEP)

METHODS = ("none", "fedper", "fedrep", "ditto", "local")
PERSONAL_STATE = "personal_state"  # the Client.state entry holding a client's personal tensors


def matches(name: str, pattern: str) -> bool:
    """``pattern`` names ``name`` exactly, as a dotted prefix (``classifier``) or as a glob (``*.lora_B.*``)."""
    return name == pattern or name.startswith(pattern + ".") or fnmatchcase(name, pattern)


def head_names(fm) -> list[str]:
    """Trainable-state names of the task head (``classifier.*`` for BERT, ``score.*`` for Llama)."""
    model = fm.model.get_base_model() if hasattr(fm.model, "get_base_model") else fm.model
    heads = set(head_modules(model)) if fm.task == "seq_cls" else set()
    return [k for k in fm.params if k.split(".")[0] in heads]


def select_personal(names: Sequence[str], patterns: Sequence[str]) -> list[str]:
    """The names any pattern matches; a pattern that matches nothing is a one-line error."""
    for pattern in patterns:
        if not any(matches(n, pattern) for n in names):
            shown = ", ".join(list(names)[:4]) + (", ..." if len(names) > 4 else "")
            raise FedfmError(
                f"personalization.personal: {pattern!r} matches no trainable tensor (names: {shown})"
            )
    return [n for n in names if any(matches(n, p) for p in patterns)]


@dataclass
class PersonalPlan:
    """The split of the trainable state and the initial values of the personal part."""

    method: str
    order: tuple[str, ...]  # every trainable-state name, in model order
    personal_keys: tuple[str, ...]  # never leave the client
    initial_personal: "OrderedDict[str, torch.Tensor]"  # CPU copies of their initial values
    head_steps: int = 8
    ditto_lambda: float = 0.1
    shared_keys: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        personal = set(self.personal_keys)
        self.shared_keys = tuple(k for k in self.order if k not in personal)

    def shared(self, state: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
        """The shared part of a full state: what travels."""
        return OrderedDict((k, state[k]) for k in self.shared_keys)

    def personal_of(self, client) -> "OrderedDict[str, torch.Tensor] | None":
        """The client's stored personal tensors (None before it first trains)."""
        return client.state.get(PERSONAL_STATE)

    def full_state(self, shared: Mapping[str, torch.Tensor], personal: Mapping[str, torch.Tensor]):
        """A whole trainable state from its shared and personal parts (no copies)."""
        return OrderedDict((k, personal[k] if k in personal else shared[k]) for k in self.order)

    def global_model(self, global_state: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
        """The model a newcomer gets: the global shared tensors with the initial personal ones."""
        return self.full_state(global_state, self.initial_personal)

    def personal_states(self, clients) -> "OrderedDict[str, torch.Tensor]":
        """Every trained client's personal tensors as one flat state, ``client<cid>/<name>``.

        Written to ``personal_states.safetensors`` at the end of a simulated run so that the
        personalized models are not lost (in a deployment each client keeps its own).
        """
        return OrderedDict(
            (f"client{c.cid}/{k}", v) for c in clients if (mine := self.personal_of(c)) is not None for k, v in mine.items()
        )

    def client_model(self, client, global_state: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
        """The client's personalized model: Ditto's ``v_k``, else the global shared part plus its personal part.

        A client that has never trained gets the global model (Ditto) or the initial personal tensors.
        """
        mine = self.personal_of(client)
        if self.method == "ditto":
            return OrderedDict(mine) if mine is not None else OrderedDict(global_state)
        return self.full_state(global_state, mine if mine is not None else self.initial_personal)


def check_personalization(cfg) -> None:
    """One-line errors for combinations that cannot work (``cfg`` is a RunConfig)."""
    p = cfg.personalization
    if p.method == "none":
        return
    where = f"personalization.method={p.method}"
    continual = getattr(cfg, "continual", None)
    if continual is not None and continual.enabled:
        raise FedfmError(f"{where} cannot be combined with continual learning (continual.enabled) yet")
    if cfg.privacy.dp_sgd.enabled:
        raise FedfmError(f"{where} cannot be combined with privacy.dp_sgd yet (its personal steps would run without DP-SGD)")
    if p.method == "local":
        conflicts = [
            ("privacy.secure_aggregation", cfg.privacy.secure_aggregation.enabled),
            ("privacy.client_dp", cfg.privacy.client_dp.enabled),
            (f"robust.rule={cfg.robust.rule}", ROBUST_RULES.supports(cfg.robust.rule, NEEDS_ALL_UPDATES)),
            (f"attack.name={cfg.attack.name}", ATTACKS.supports(cfg.attack.name, MODEL_POISONING)
             or ATTACKS.supports(cfg.attack.name, POISONS_DATA)),
            (f"algorithm.name={cfg.algorithm.name}",  # nothing to aggregate: only plain FedAvg is meaningful
             not ALGORITHMS.supports(cfg.algorithm.name, SGD_SERVER_STEP, PLAIN_CLIENT)),
        ]
        for what, on in conflicts:
            if on:
                raise FedfmError(f"{where} trains every client alone and aggregates nothing: {what} does not apply")


def build_plan(cfg, fm) -> PersonalPlan | None:
    """The plan for ``cfg`` (a PersonalizationConfig) on the built model ``fm``; None when off."""
    if cfg.method == "none":
        return None
    if cfg.method not in METHODS:
        raise FedfmError(f"unknown personalization.method {cfg.method!r}; valid: {', '.join(METHODS)}")
    names = list(fm.params)
    if cfg.method == "ditto":
        personal: list[str] = []
    elif cfg.method == "local":
        personal = names
    elif cfg.personal is not None:
        personal = select_personal(names, cfg.personal)
    else:
        personal = head_names(fm)
        if not personal:
            raise FedfmError(
                f"personalization.method={cfg.method}: the {fm.task} model has no task head to keep on the "
                "clients; name the personal tensors in personalization.personal"
            )
    if cfg.method in ("fedper", "fedrep") and len(personal) == len(names):
        raise FedfmError(
            "personalization.personal covers the whole trainable state, so nothing is shared: "
            "use personalization.method=local for that"
        )
    with torch.no_grad():
        initial = OrderedDict((k, fm.params[k].detach().to("cpu", copy=True)) for k in personal)
    return PersonalPlan(
        method=cfg.method,
        order=tuple(names),
        personal_keys=tuple(personal),
        initial_personal=initial,
        head_steps=cfg.head_steps,
        ditto_lambda=cfg.ditto_lambda,
    )
