"""Personalized evaluation: every client's own model on its local test split.

Beside the global evaluation (:func:`fedfm.eval.evaluate.evaluate`), each
client is scored with its personalized model (:meth:`PersonalPlan.client_model`:
the global shared tensors plus its personal ones, or Ditto's ``v_k``; a client
that never trained gets the initial personal tensors, or the global model
under Ditto). States are swapped into the one shared model in place, one
client at a time; only the personal tensors are copied when the shared part
is already loaded. Fairness statistics over clients are those of
:func:`fedfm.eval.fairness.fairness_stats` (as in Ditto, Li et al. 2021).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from fedfm.eval.evaluate import _metrics, score_examples
from fedfm.eval.fairness import fairness_stats
from fedfm.models.state import set_state_, state_nbytes


def copy_into_(params: Mapping[str, torch.nn.Parameter], tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy a subset of the trainable tensors into the live parameters in place."""
    with torch.no_grad():
        for k, t in tensors.items():
            params[k].copy_(t)


def evaluate_personalized(fm, enc, clients, plan, global_state: Mapping[str, torch.Tensor], batch_size: int) -> dict:
    """Per-client personalized metrics and their fairness statistics.

    Keys: ``client_personal_<m>_{mean,worst10,std,min,max}`` with ``<m>`` the
    accuracy (``seq_cls``) or perplexity (``causal_lm``), and
    ``per_client_personal`` with each client's value. Leaves the model holding
    the last client's state (every user of the model sets its own first).
    """
    key = "perplexity" if fm.task == "causal_lm" else "accuracy"
    per: dict[int, float] = {}
    base = plan.global_model(global_state)
    set_state_(fm.params, base)
    for c in clients:
        if len(c.test_idx) == 0:
            continue
        if plan.method == "ditto":
            set_state_(fm.params, plan.client_model(c, global_state))
        else:
            mine = plan.personal_of(c)
            copy_into_(fm.params, mine if mine is not None else plan.initial_personal)
        scores = score_examples(fm, enc, np.asarray(c.test_idx), batch_size)
        m = _metrics(scores, slice(0, len(c.test_idx)), fm.task)
        if m:
            per[c.cid] = m[key]
    out: dict = {}
    if per:
        stats = fairness_stats(np.array(list(per.values())), higher_is_better=(key == "accuracy"))
        out.update({f"client_personal_{key}_{k}": v for k, v in stats.items()})
    out["per_client_personal"] = {str(cid): v for cid, v in per.items()}
    return out


def personal_summary(plan, clients, records: list[dict], task: str) -> dict:
    """What ``summary.json`` reports under ``personalization``."""
    key = "perplexity" if task == "causal_lm" else "accuracy"
    evals = [r for r in records if f"client_personal_{key}_mean" in r]
    last = evals[-1] if evals else {}
    kept = [plan.personal_of(c) for c in clients if plan.personal_of(c) is not None]
    example = kept[0] if kept else plan.initial_personal
    return {
        "method": plan.method,
        "personal_tensors": list(plan.personal_keys) if plan.method in ("fedper", "fedrep") else "all",
        "shared_tensors": len(plan.shared_keys),
        "personal_state_bytes": state_nbytes(example),  # per client, kept on it, never sent
        "clients_personalized": len(kept),
        f"final_client_personal_{key}_mean": last.get(f"client_personal_{key}_mean"),
        f"final_client_personal_{key}_worst10": last.get(f"client_personal_{key}_worst10"),
        f"final_client_{key}_mean": last.get(f"client_{key}_mean"),
    }
