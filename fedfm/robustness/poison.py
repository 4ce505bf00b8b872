"""Data-poisoning set-up for a run: poisoned training rows and triggered test rows.

Runs once, before the first round. Poisoned rows are *appended* to the one
tokenized table (:class:`~fedfm.data.encode.Encoded`): the dataset's own rows
are never changed, nothing is re-tokenized per round, and a malicious
client's ``train_idx`` is simply pointed at its poisoned copies.

* ``label_flip`` — every training row of a malicious client is replaced by a
  copy with a flipped label (:func:`~fedfm.robustness.attacks.flip_labels`:
  ``y → C − 1 − y``, ``y + 1 mod C`` or an explicit mapping).
* ``backdoor`` — Bagdasaryan et al. 2020 ("How To Backdoor Federated
  Learning", AISTATS; arXiv 2018): a share ``attack.poison_fraction`` of a
  malicious client's training rows (rows not already of the target class
  first, :func:`~fedfm.robustness.attacks.backdoor_pick`) is replaced by
  copies with the trigger inserted and the label set to
  ``attack.target_label``; the client trains on that mix of clean and
  triggered rows. Its training set keeps its size, so its reported example
  count (its FedAvg weight) is unchanged and the boost ``γ`` applied to its
  delta (:meth:`~fedfm.robustness.attacks.Attack.apply`) is the only scaling.
* Backdoor evaluation — the global test rows whose label is not the target,
  with the trigger inserted and labelled with the target, so that a
  classifier's accuracy on them *is* the backdoor success rate
  (:func:`fedfm.eval.backdoor.backdoor_success`).

Classification only: there is no label to flip or to target in causal LM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from fedfm.data.encode import Encoded, concat, encode
from fedfm.errors import FedfmError
from fedfm.registry import FLIPS_LABELS, TRIGGERS
from fedfm.robustness.attacks import Attack, add_trigger, backdoor_pick, flip_labels


@dataclass
class PoisonedData:
    """The table with appended rows, the triggered test rows, and what each attacker got."""

    enc: Encoded
    backdoor_rows: np.ndarray | None = None  # triggered global-test rows, labelled with the target
    poisoned_rows: dict[int, int] = field(default_factory=dict)  # client id -> poisoned training rows


def check_poisoning(attack: Attack, task: str, num_classes: int | None, eval_backdoor: bool = False) -> None:
    """One-line errors for data attacks (and backdoor evaluation) this run cannot serve."""
    wants = [f"attack.name={attack.name}"] if attack.poisons_data else []
    if eval_backdoor:
        wants.append("eval.backdoor=true")
    if not wants:
        return
    if task != "seq_cls" or num_classes is None:
        raise FedfmError(f"{' and '.join(wants)} needs a classification task (model.task=seq_cls), not {task}")
    if (attack.supports(TRIGGERS) or eval_backdoor) and not 0 <= attack.target_label < num_classes:
        raise FedfmError(f"attack.target_label={attack.target_label} is not a class of this dataset (0..{num_classes - 1})")
    if attack.supports(FLIPS_LABELS):
        try:
            flip_labels([0], num_classes, attack.flip_mode, attack.flip_map)
        except ValueError as err:
            raise FedfmError(f"attack.flip_map: {err}") from None


def prepare_poisoning(
    attack: Attack,
    clients: Sequence,
    malicious: Sequence[int],
    texts: Sequence[str],
    enc: Encoded,
    tokenizer,
    max_length: int,
    num_classes: int,
    test_idx: np.ndarray,
    eval_backdoor: bool = False,
) -> PoisonedData:
    """Append the poisoned rows to ``enc`` and point the malicious clients at them.

    ``clients`` are modified in place (a malicious client's ``train_idx``);
    ``enc`` itself is not. Backdoor test rows are built when the attack is
    ``backdoor`` or ``eval_backdoor`` is set. Everything new is tokenized in
    one call.
    """
    check_poisoning(attack, "seq_cls" if enc.labels is not None else "causal_lm", num_classes, eval_backdoor)
    extra: list[Encoded] = []
    poisoned: dict[int, int] = {}
    if attack.supports(FLIPS_LABELS):
        extra += flipped_rows(attack, clients, malicious, enc, num_classes, poisoned)
    start = len(enc) + sum(len(e) for e in extra)
    trig_texts: list[str] = []
    if attack.supports(TRIGGERS):
        trig_texts += triggered_rows(attack, clients, malicious, texts, enc.labels, start, poisoned)
    backdoor_rows = None
    if attack.supports(TRIGGERS) or eval_backdoor:  # the test rows that measure the backdoor
        test = np.asarray(test_idx, dtype=np.int64)
        test = test[enc.labels[test].numpy() != attack.target_label]
        backdoor_rows = np.arange(start + len(trig_texts), start + len(trig_texts) + len(test), dtype=np.int64)
        trig_texts += add_trigger([texts[i] for i in test], attack.trigger, attack.trigger_position,
                                  seed=attack.seed * 1_000_003 + 999_983)
    if trig_texts:  # every triggered row carries the target label; tokenized in one call
        extra.append(encode(trig_texts, tokenizer, max_length, np.full(len(trig_texts), attack.target_label, dtype=np.int64)))
    return PoisonedData(concat(enc, *extra) if extra else enc, backdoor_rows, poisoned)


def flipped_rows(attack: Attack, clients: Sequence, malicious: Sequence[int], enc: Encoded, num_classes: int,
                 poisoned: dict[int, int]) -> list[Encoded]:
    """Label flipping: a copy of each malicious client's rows with flipped labels, appended after ``enc``."""
    extra: list[Encoded] = []
    for cid in malicious:
        c = clients[cid]
        rows = torch.as_tensor(np.asarray(c.train_idx, dtype=np.int64))
        start = len(enc) + sum(len(e) for e in extra)
        extra.append(Encoded(
            input_ids=enc.input_ids[rows],
            attention_mask=enc.attention_mask[rows],
            lengths=enc.lengths[rows],
            labels=flip_labels(enc.labels[rows], num_classes, attack.flip_mode, attack.flip_map),
        ))
        c.train_idx = np.arange(start, start + len(rows), dtype=np.int64)
        poisoned[cid] = len(rows)
    return extra


def triggered_rows(attack: Attack, clients: Sequence, malicious: Sequence[int], texts: Sequence[str], labels,
                   start: int, poisoned: dict[int, int]) -> list[str]:
    """Backdoor: each malicious client swaps a share of its rows for triggered copies (new rows from ``start``)."""
    out: list[str] = []
    for cid in malicious:
        c = clients[cid]
        rows = np.asarray(c.train_idx, dtype=np.int64)
        rng = np.random.default_rng([attack.seed, cid, 0xBD])
        pick = backdoor_pick(labels[rows].numpy(), attack.target_label, attack.poison_fraction, rng)
        keep = np.setdiff1d(np.arange(len(rows)), pick)
        new = np.arange(start + len(out), start + len(out) + len(pick), dtype=np.int64)
        out += add_trigger([texts[i] for i in rows[pick]], attack.trigger, attack.trigger_position,
                           seed=attack.seed * 1_000_003 + cid)
        c.train_idx = np.concatenate([rows[keep], new])
        poisoned[cid] = len(pick)
    return out
