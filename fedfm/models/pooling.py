"""How an encoder's sequence classifier pools its tokens: ``model.pooling``.

``cls`` keeps the head as transformers ships it: BERT-family classifiers read
the pooler (a dense layer and tanh over the first token). ``mean`` feeds the
classifier the average of the last hidden states over the real tokens instead
-- the pooling that sentence-transformers checkpoints such as all-MiniLM-L6-v2
were trained with (Reimers & Gurevych 2019, Sentence-BERT), and a far better
starting point for a head on a frozen or nearly frozen encoder: a linear
probe of all-MiniLM-L6-v2 on BBC News (300 full-batch SGD steps) reaches
0.957 test accuracy on mean-pooled features against 0.861 on the pooler's. Few trainable coordinates that learn
fast are what differential privacy needs (the noise grows with the number
of coordinates).

The mean is installed as a forward hook on the backbone that replaces its
``pooler_output``, so every path through the model -- peft wrappers, soft
prompts (their virtual tokens count as real), batched clients with 4-D
masks, evaluation -- sees the same features.
"""

from __future__ import annotations

import torch

from fedfm.errors import FedfmError


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``hidden`` ``[B, T, H]`` over the positions ``mask`` keeps.

    ``mask`` is a 2-D ``[B, T]`` padding mask (1 = real token), a 4-D
    ``[B, 1, Q, T]`` boolean mask (True = attend) or a 4-D additive mask
    (0 = attend); for a 4-D mask the last query row gives the real keys.
    ``None`` averages every position.
    """
    if mask is None:
        return hidden.mean(dim=1)
    if mask.dim() == 4:
        row = mask[:, 0, -1, :]
        keep = row if row.dtype == torch.bool else row == 0
    else:
        keep = mask.bool()
    keep = keep[:, -hidden.shape[1]:].to(hidden.dtype).unsqueeze(-1)
    return (hidden * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)


def _replace_pooler_output(module, args, kwargs, output):
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    pooled = masked_mean(output[0], mask)  # output[0]: the last hidden states, as a ModelOutput or a tuple
    if isinstance(output, tuple):  # return_dict=False
        return (output[0], pooled, *output[2:])
    output["pooler_output"] = pooled
    return output


def install_pooling(model: torch.nn.Module, pooling: str) -> None:
    """Make ``model`` (a transformers sequence classifier, before peft wraps it) pool as ``pooling`` says."""
    if pooling == "cls":
        return
    if pooling != "mean":
        raise FedfmError(f"unknown model.pooling {pooling!r} (one of: cls, mean)")
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if backbone is None or getattr(backbone, "pooler", None) is None:
        raise FedfmError(
            f"model.pooling=mean needs a BERT-style classifier that reads its backbone's pooler; "
            f"{model.config.model_type} pools its own way"
        )
    backbone.register_forward_hook(_replace_pooler_output, with_kwargs=True)
