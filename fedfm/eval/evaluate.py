"""Evaluation of the current global model: global test set and every client's local test split.

All rows to score (global test + local tests) go through the model in one
length-sorted pass, then the per-example results are grouped, so per-client
metrics cost no extra forward passes beyond their own rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fedfm.data.encode import Encoded, make_batch
from fedfm.eval.baseline import majority_label, prior_accuracy
from fedfm.eval.fairness import client_stats


@dataclass
class ExampleScores:
    """Per-example results: summed loss, number of scored targets, and correct targets."""

    loss_sum: np.ndarray
    targets: np.ndarray
    correct: np.ndarray


@torch.no_grad()
def score_examples(fm, enc: Encoded, rows: np.ndarray, batch_size: int) -> ExampleScores:
    """Score ``rows`` (indices into ``enc``) with the model in eval mode."""
    rows = np.asarray(rows, dtype=np.int64)
    n = len(rows)
    loss_sum = np.zeros(n)
    targets = np.zeros(n)
    correct = np.zeros(n)
    order = np.argsort(-enc.lengths[torch.as_tensor(rows)].numpy(), kind="stable")
    was_training = fm.model.training
    device = fm.device  # batches go where the model is; results come back to the CPU
    fm.model.eval()
    try:
        for start in range(0, n, batch_size):
            pos = order[start : start + batch_size]
            idx = torch.as_tensor(rows[pos])
            batch = make_batch(enc, idx, fm.task, device)
            labels = batch.pop("labels")
            logits = fm.model(**batch).logits.float()
            if fm.task == "causal_lm":
                logits = logits[:, -labels.shape[1] :, :]  # drop virtual-token positions (prompt tuning)
                shift_logits = logits[:, :-1, :]
                shift_labels = labels[:, 1:]
                tok_loss = F.cross_entropy(
                    shift_logits.reshape(-1, shift_logits.shape[-1]),
                    shift_labels.reshape(-1),
                    ignore_index=-100,
                    reduction="none",
                ).view(shift_labels.shape)
                valid = shift_labels != -100
                hit = (shift_logits.argmax(-1) == shift_labels) & valid
                loss_sum[pos] = tok_loss.sum(1).cpu().numpy()
                targets[pos] = valid.sum(1).cpu().numpy()
                correct[pos] = hit.sum(1).cpu().numpy()
            else:
                loss_sum[pos] = F.cross_entropy(logits, labels, reduction="none").cpu().numpy()
                targets[pos] = 1
                correct[pos] = (logits.argmax(-1) == labels).cpu().numpy()
    finally:
        fm.model.train(was_training)
    return ExampleScores(loss_sum, targets, correct)


def _metrics(scores: ExampleScores, sel: slice | np.ndarray, task: str) -> dict[str, float]:
    tgt = scores.targets[sel].sum()
    if tgt == 0:
        return {}
    loss = float(scores.loss_sum[sel].sum() / tgt)
    out = {"loss": loss, "accuracy": float(scores.correct[sel].sum() / tgt)}
    if task == "causal_lm":
        out["perplexity"] = float(math.exp(min(loss, 50.0)))
    return out


def evaluate(fm, enc: Encoded, test_idx: np.ndarray, clients, batch_size: int, per_client: bool = True,
             min_client_test: int = 1) -> dict:
    """Global test metrics plus per-client metrics and their fairness statistics.

    Keys: ``test_loss``, ``test_accuracy`` (token accuracy for causal LM),
    ``test_perplexity`` (causal LM); for classification ``test_prior_accuracy``,
    the majority-class baseline (:mod:`fedfm.eval.baseline`: always the most
    frequent label of the clients' training rows). With ``per_client``:
    ``client_<m>_{mean,median,worst10,std,min,max}`` over the clients with at
    least ``min_client_test`` local test rows (:func:`fedfm.eval.fairness.client_stats`),
    ``clients_counted`` / ``clients_too_small`` (how many were in / left out),
    ``client_prior_accuracy_mean`` over the same clients, and ``per_client``
    with every client's value (also those left out).
    """
    parts = [np.asarray(test_idx, dtype=np.int64)]
    bounds = [0, len(parts[0])]
    if per_client:
        for c in clients:
            parts.append(np.asarray(c.test_idx, dtype=np.int64))
            bounds.append(bounds[-1] + len(c.test_idx))
    rows = np.concatenate(parts)
    scores = score_examples(fm, enc, rows, batch_size)
    out: dict = {f"test_{k}": v for k, v in _metrics(scores, slice(0, bounds[1]), fm.task).items()}
    labels = enc.labels.numpy() if fm.task != "causal_lm" and enc.labels is not None else None
    majority = None
    if labels is not None and clients:
        majority = majority_label(labels, np.concatenate([np.asarray(c.train_idx, dtype=np.int64) for c in clients]))
    if majority is not None and len(parts[0]):
        out["test_prior_accuracy"] = prior_accuracy(labels, parts[0], majority)
    if per_client:
        key = "perplexity" if fm.task == "causal_lm" else "accuracy"
        per, sizes = {}, {}
        for i, c in enumerate(clients):
            m = _metrics(scores, slice(bounds[i + 1], bounds[i + 2]), fm.task)
            if m:
                per[c.cid], sizes[c.cid] = m, len(c.test_idx)
        if per:
            stats = client_stats({c: m[key] for c, m in per.items()}, sizes, min_client_test,
                                 higher_is_better=(key == "accuracy"))
            out["clients_counted"], out["clients_too_small"] = stats.pop("counted"), stats.pop("too_small")
            out.update({f"client_{key}_{k}": v for k, v in stats.items()})
            if majority is not None and out["clients_counted"]:
                out["client_prior_accuracy_mean"] = float(np.mean([
                    prior_accuracy(labels, c.test_idx, majority) for c in clients
                    if c.cid in per and sizes[c.cid] >= min_client_test]))
        out["per_client"] = {str(cid): m[key] for cid, m in per.items()}
    return out
