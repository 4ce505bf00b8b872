"""Batched adapters: G clients per vmapped forward/backward against clients one after another.

all-MiniLM-L6-v2 + LoRA (r = 8) on BBC News, ``--clients`` clients of 32
examples, ``--steps`` local steps of batch 8 each. The same clients are
trained by :class:`~fedfm.client.trainer.LocalTrainer` (one after another)
and by :class:`~fedfm.client.batched.BatchedTrainer` with each group size in
``--groups``; dropout is switched off so both must give the same deltas (the
script checks the largest difference). Prints seconds per client and the
speed-up of each group size over one-after-another, on ``--device``.

    python bench/batched.py                        # CPU
    python bench/batched.py --device cuda --clients 64 --groups 1 8 32 64
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fedfm.algorithms.base import Broadcast  # noqa: E402
from fedfm.algorithms.fedavg import FedAvg  # noqa: E402
from fedfm.config.schema import DataConfig, ModelConfig, TrainConfig  # noqa: E402
from fedfm.data.encode import encode  # noqa: E402
from fedfm.data.sources import load_text_dataset  # noqa: E402
from fedfm.models import build_model  # noqa: E402
from fedfm.models.state import get_state  # noqa: E402
from fedfm.client.batched import BatchedTrainer  # noqa: E402
from fedfm.client.data import Client  # noqa: E402
from fedfm.client.trainer import LocalTrainer  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--groups", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    ds = load_text_dataset(DataConfig(), "seq_cls", seed=0)
    fm = build_model(ModelConfig(name="minilm", method="lora", max_length=64), len(ds.label_names), seed=0, device=device)
    for m in fm.model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    enc = encode(ds.texts, fm.tokenizer, 64, ds.labels)
    clients = [Client(c, np.arange(32 * c, 32 * c + 32), np.arange(0)) for c in range(args.clients)]
    tc = TrainConfig(local_steps=args.steps, batch_size=8, lr=3e-3)
    g = get_state(fm.params)
    b = Broadcast({k: v.cpu() for k, v in g.items()}, 0)

    def sequential():
        t = LocalTrainer(fm, enc, tc, seed=0)
        return {c.cid: t.local_update(FedAvg(), b, c, 1) for c in clients}

    def batched(G):
        t = BatchedTrainer(LocalTrainer(fm, enc, tc, seed=0), G)
        t.schedule(clients)
        return {c.cid: t.local_update(FedAvg(), b, c, 1) for c in clients}

    def timed(fn):
        fn()  # warm-up (kernels, allocator)
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        return time.perf_counter() - t0, out

    base_s, ref = timed(sequential)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{name}: {args.clients} clients x {args.steps} steps of batch 8 (MiniLM + LoRA r=8)")
    print("| clients per forward/backward | s per client | speed-up | max |delta diff| |")
    print("|---|---|---|---|")
    print(f"| 1 (one after another) | {base_s / args.clients:.4f} | 1.00x | - |")
    for G in args.groups:
        s, out = timed(lambda: batched(G))
        diff = max(float((out[c].delta[k] - ref[c].delta[k]).abs().max()) for c in ref for k in ref[c].delta)
        print(f"| {G} | {s / args.clients:.4f} | {base_s / s:.2f}x | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
