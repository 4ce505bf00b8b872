"""Batched inference with a trained model: class probabilities and generated continuations.

The model is used as loaded (one model, many rows): rows go through it in
length-sorted batches (as :func:`fedfm.eval.evaluate.score_examples` does),
each batch trimmed to its longest row, under ``torch.inference_mode``.
Predictions are written as JSON lines or CSV.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from fedfm.data.encode import Encoded, encode
from fedfm.errors import FedfmError

OUT_FORMATS = (".jsonl", ".csv")


@torch.inference_mode()
def class_logits(fm, enc: Encoded, rows: np.ndarray, batch_size: int) -> torch.Tensor:
    """The classifier's logits ``[len(rows), num_labels]`` (float32, CPU) for ``rows`` of ``enc``, in ``rows`` order."""
    rows = np.asarray(rows, dtype=np.int64)
    out = None
    order = np.argsort(-enc.lengths[torch.as_tensor(rows)].numpy(), kind="stable")
    was_training = fm.model.training
    fm.model.eval()
    try:
        for start in range(0, len(rows), batch_size):
            pos = order[start : start + batch_size]
            idx = torch.as_tensor(rows[pos])
            width = int(enc.lengths[idx].max())
            batch = {"input_ids": enc.input_ids[idx, :width].to(fm.device),
                     "attention_mask": enc.attention_mask[idx, :width].to(fm.device)}
            logits = fm.model(**batch).logits.float().cpu()
            if out is None:
                out = torch.empty(len(rows), logits.shape[-1])
            out[torch.as_tensor(pos)] = logits
    finally:
        fm.model.train(was_training)
    return out if out is not None else torch.empty(0, 0)


@torch.inference_mode()
def generate(fm, texts: list[str], max_length: int, max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy continuations of ``texts``: the arg max of the model's next-token logits, appended, repeated.

    Each step runs the model on the whole right-padded sequence, exactly as
    training and :func:`fedfm.eval.evaluate.score_examples` run it (no
    key-value cache: peft's ``generate`` handles soft prompts and prefixes
    differently from the forward pass they were trained with), so a batched
    row gets the continuation it gets alone. A prompt keeps its last
    ``max_length`` tokens, without a closing separator/end token; a row stops
    at the end-of-sequence token. Only the new tokens are decoded.
    """
    tok = fm.tokenizer
    side = tok.truncation_side
    tok.truncation_side = "left"  # a long prompt keeps its end, where the continuation starts
    try:
        enc = encode(texts, tok, max_length)
    finally:
        tok.truncation_side = side
    closing = torch.tensor([t for t in (tok.sep_token_id, tok.eos_token_id) if t is not None], dtype=torch.int64)
    rows = torch.arange(len(texts))
    last = enc.input_ids[rows, enc.lengths - 1]
    drop = torch.isin(last, closing) & (enc.lengths > 1)
    enc.attention_mask[rows[drop], enc.lengths[drop] - 1] = 0
    enc.input_ids[rows[drop], enc.lengths[drop] - 1] = tok.pad_token_id
    enc.lengths = enc.lengths - drop.long()
    _check_positions(fm, int(enc.lengths.max()) + max_new_tokens)
    out: list[str] = [""] * len(texts)
    order = np.argsort(-enc.lengths.numpy(), kind="stable")
    was_training = fm.model.training
    fm.model.eval()
    try:
        for start in range(0, len(texts), batch_size):
            pos = order[start : start + batch_size]
            for i, ids in zip(pos, _greedy(fm, enc, torch.as_tensor(pos), max_new_tokens)):
                out[i] = tok.decode(ids, skip_special_tokens=True)
    finally:
        fm.model.train(was_training)
    return out


def _greedy(fm, enc: Encoded, idx: torch.Tensor, max_new_tokens: int) -> list[list[int]]:
    """The new token ids of rows ``idx`` of ``enc`` (right-padded), greedy, up to ``max_new_tokens`` each."""
    lengths = enc.lengths[idx].clone()
    width = int(lengths.max())
    ids = torch.cat([enc.input_ids[idx, :width], torch.full((len(idx), max_new_tokens), fm.tokenizer.pad_token_id)], 1)
    mask = torch.cat([enc.attention_mask[idx, :width], torch.zeros(len(idx), max_new_tokens, dtype=torch.int64)], 1)
    eos = fm.tokenizer.eos_token_id
    new: list[list[int]] = [[] for _ in range(len(idx))]
    done = torch.zeros(len(idx), dtype=torch.bool)
    rows = torch.arange(len(idx))
    for step in range(max_new_tokens):
        w = width + step
        logits = fm.model(input_ids=ids[:, :w].to(fm.device), attention_mask=mask[:, :w].to(fm.device)).logits
        logits = logits[:, -w:, :]  # drop virtual-token positions (prompt tuning)
        nxt = logits[rows.to(logits.device), (lengths - 1).to(logits.device)].argmax(-1).cpu()
        live = ~done
        ids[rows[live], lengths[live]] = nxt[live]
        mask[rows[live], lengths[live]] = 1
        for r in rows[live].tolist():
            new[r].append(int(nxt[r]))
        lengths = lengths + live.long()
        done = done | (nxt == eos) if eos is not None else done
        if bool(done.all()):
            break
    return new


def _check_positions(fm, needed: int) -> None:
    """Refuse a prompt plus continuation longer than the model's positions (one line, before any work)."""
    limit = getattr(fm.model.config, "max_position_embeddings", None)
    if limit and needed > limit:
        raise FedfmError(f"a prompt plus --max-new-tokens needs {needed} positions; the model has {limit}")


def label_rows(texts: list[str], probs: torch.Tensor, names: list[str]) -> list[dict]:
    """One record per text: the top label, its probability and the whole distribution."""
    top = probs.argmax(-1).tolist()
    return [
        {"text": t, "label": names[k], "probability": float(p[k]), "probabilities": dict(zip(names, p.tolist()))}
        for t, k, p in zip(texts, top, probs)
    ]


def check_out_path(path: str | Path) -> Path:
    """Refuse an output file of a format :func:`write_predictions` cannot write, before any work."""
    path = Path(path)
    if path.suffix.lower() not in OUT_FORMATS:
        raise FedfmError(f"--out {path}: write predictions as {' or '.join(OUT_FORMATS)}")
    if path.is_dir():
        raise FedfmError(f"--out {path} is a folder, not a file")
    return path


def write_predictions(records: list[dict], path: str | Path) -> Path:
    """``records`` as JSON lines, or CSV with one ``p_<label>`` column per class."""
    path = check_out_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        return path
    import pandas as pd

    flat = [{**{k: v for k, v in r.items() if k != "probabilities"},
             **{f"p_{name}": p for name, p in r.get("probabilities", {}).items()}} for r in records]
    pd.DataFrame(flat).to_csv(path, index=False)
    return path
