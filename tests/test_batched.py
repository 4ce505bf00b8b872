"""Several clients trained in one vmapped forward/backward equal the one-at-a-time trainer."""

import numpy as np
import pytest
import torch

import fedfm
from fedfm.algorithms.base import Broadcast
from fedfm.algorithms.fedavg import FedAvg
from fedfm.algorithms.fedprox import FedProx
from fedfm.config.schema import ModelConfig, TrainConfig
from fedfm.errors import FedfmError
from fedfm.models import build_model
from fedfm.models.state import get_state
from fedfm.client.batched import BatchedTrainer, additive_mask
from fedfm.client.data import Client
from fedfm.client.trainer import LocalTrainer

from tables import random_table
from test_end_to_end import tiny_cls_overrides

pytestmark = pytest.mark.usefixtures("one_thread")


def no_dropout(fm):
    for m in fm.model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return fm


def table():
    return random_table(60, seed=5, min_length=3)


# sizes 9, 3 and 14 with batch 4: uneven last batches and a client smaller than one batch
CLIENTS = [Client(0, np.arange(0, 9), np.arange(0)), Client(1, np.arange(9, 12), np.arange(0)),
           Client(2, np.arange(20, 34), np.arange(0))]


@pytest.mark.parametrize("name, method, task, clip, optimizer, pooling", [
    ("tiny-bert", "lora", "seq_cls", None, "adamw", "cls"),
    ("tiny-bert", "lora", "seq_cls", 0.05, "adamw", "cls"),
    ("tiny-bert", "lora", "seq_cls", None, "adamw", "mean"),  # the mean reads the 4-D additive mask
    ("tiny-llama", "lora", "causal_lm", None, "adamw", "cls"),
    # full fine-tuning: SGD, because AdamW's first step g / (|g| + eps) turns float noise in the many
    # near-zero gradients of a whole model into visible differences (about 1% of 0.01 on a few entries)
    ("tiny-bert", "full", "seq_cls", None, "sgd", "cls"),
])
def test_batched_clients_equal_clients_trained_one_after_another(name, method, task, clip, optimizer, pooling):
    fm = no_dropout(build_model(ModelConfig(name=name, method=method, task=task, max_length=16, pooling=pooling),
                                3 if task == "seq_cls" else None, seed=0))
    enc = table()
    tc = TrainConfig(local_steps=4, batch_size=4, lr=0.01, max_grad_norm=clip, optimizer=optimizer)
    g = get_state(fm.params)
    seq = LocalTrainer(fm, enc, tc, seed=3)
    expect = {c.cid: seq.local_update(FedAvg(), Broadcast(g, 2), c, 7) for c in CLIENTS}
    batched = BatchedTrainer(LocalTrainer(fm, enc, tc, seed=3), group_size=3)
    batched.schedule(CLIENTS)
    got = {c.cid: batched.local_update(FedAvg(), Broadcast(g, 2), c, 7) for c in CLIENTS}
    for cid, ref in expect.items():
        assert got[cid].metrics["train_loss"] == pytest.approx(ref.metrics["train_loss"], rel=1e-4)
        assert got[cid].base_version == 2 and got[cid].num_examples == ref.num_examples
        for k, v in ref.delta.items():
            assert torch.allclose(got[cid].delta[k], v, atol=2e-6, rtol=1e-4), (cid, k)
    assert max(float(v.abs().max()) for v in expect[0].delta.values()) > 1e-4  # it did train


def test_the_additive_mask_hides_padding_and_the_future():
    m = additive_mask(torch.tensor([[1, 1, 0]]), causal=True)[0, 0]
    lo = torch.finfo(torch.float32).min
    assert m.tolist() == [[0, lo, lo], [0, 0, lo], [0, 0, lo]]
    assert additive_mask(torch.tensor([[1, 0]]), causal=False)[0, 0].tolist() == [[0, lo], [0, lo]]


def test_batching_refuses_hooked_algorithms_and_unsupported_configs(tmp_path):
    fm = build_model(ModelConfig(name="tiny-bert", method="lora", max_length=16), 3, seed=0)
    batched = BatchedTrainer(LocalTrainer(fm, table(), TrainConfig(local_steps=1, batch_size=4), seed=0), 2)
    with pytest.raises(FedfmError, match="fedprox"):
        batched.local_update(FedProx(mu=0.1), Broadcast(get_state(fm.params)), CLIENTS[0], 1)
    with pytest.raises(FedfmError, match="algorithm.name=scaffold"):
        fedfm.run(None, tiny_cls_overrides(tmp_path, **{"train.batch_clients": 3, "algorithm.name": "scaffold"}))


def test_a_run_with_batched_clients_learns(tmp_path):
    summary = fedfm.run(None, tiny_cls_overrides(tmp_path, **{"train.batch_clients": 3, "workers": 1}))
    assert summary["final_accuracy"] > 0.8, summary  # chance is 1/3
