"""Cost of a local DP-SGD step against a plain step on the same model and batches.

    python bench/dp_sgd_overhead.py [--model minilm] [--method lora] [--device cpu] [--steps 20]

Times ``--steps`` local steps of batch 16 (64 tokens, BBC News) three ways:
plain (one batched forward/backward, the LocalTrainer's loop), DP-SGD with
Opacus per-example-gradient hooks, and DP-SGD one example at a time (the
fallback engine); each DP step includes Poisson sampling, clipping and noise.
Prints ms per step and the ratios to plain (the minimum of ``--repeats``
alternating repeats per side).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from fedfm.config.schema import DataConfig, ModelConfig
from fedfm.data.encode import encode, make_batch
from fedfm.data.sources import load_text_dataset
from fedfm.models import build_model
from fedfm.privacy.dp_sgd import LocalDPSGD, SampleLevelAccountant


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--method", default="lora")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    ds = load_text_dataset(DataConfig(dataset="bbc_news"), "seq_cls", seed=0)
    fm = build_model(ModelConfig(name=args.model, method=args.method, max_length=64), len(ds.label_names), seed=0)
    fm.model.to(dev)
    enc = encode(ds.texts, fm.tokenizer, 64, ds.labels)
    n = 160  # one client's examples: q = batch / n
    rows = np.arange(n)
    opt = torch.optim.AdamW(fm.params.values(), lr=1e-3)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def plain():
        gen = torch.Generator().manual_seed(0)
        for _ in range(args.steps):
            idx = torch.as_tensor(rows)[torch.randperm(n, generator=gen)[: args.batch]]
            batch = {k: v.to(dev) for k, v in make_batch(enc, idx, "seq_cls").items()}
            loss = fm.model(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    def dp(engine):
        acc = SampleLevelAccountant(1.0, {0: n}, args.batch)
        dpsgd = LocalDPSGD(fm, enc, acc, max_grad_norm=1.0, engine=engine)

        def run():
            session = dpsgd.session(0, rows, args.steps, seed=0)
            for _ in range(args.steps):
                opt.zero_grad(set_to_none=True)
                session.step()
                opt.step()

        return run, dpsgd

    fm.model.train()
    best = {}

    def timed(sides):
        for fn in sides.values():  # warm-up
            fn()
        for _ in range(args.repeats):
            for name, fn in sides.items():
                sync()
                t = time.perf_counter()
                fn()
                sync()
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - t)

    loop_run, _ = dp("loop")
    timed({"plain": plain, "dp_sgd_loop": loop_run})  # before any hook is attached
    hooks_run, hooks_dp = dp("auto")  # attaches Opacus's hooks to the model for good
    timed({"dp_sgd_hooks": hooks_run})
    print(f"{args.model} {args.method} on {dev}, batch {args.batch}, {args.steps} steps, threads {torch.get_num_threads()}")
    print(f"hooks engine in use: {hooks_dp.grads.engine}")
    for name, t in best.items():
        print(f"  {name:13s} {1000 * t / args.steps:8.1f} ms/step   x{t / best['plain']:.2f}")


if __name__ == "__main__":
    main()
