"""Random token tables for tests that need an Encoded dataset without a tokenizer."""

import torch

from fedfm.data.encode import Encoded


def random_table(n: int, width: int = 12, labels: int = 3, seed: int = 0, min_length: int = 4) -> Encoded:
    """``n`` rows of random token ids (1000..2999), lengths in [min_length, width], labels in [0, labels)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 3000, (n, width), generator=g)
    lengths = torch.randint(min_length, width + 1, (n,), generator=g)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).to(torch.int64)
    return Encoded(input_ids=ids * mask, attention_mask=mask, lengths=lengths,
                   labels=torch.randint(0, labels, (n,), generator=g))
