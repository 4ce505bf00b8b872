"""Framework overhead: fedfm's simulation runtime against a plain PyTorch loop.

Both sides run the same local steps on the same model instance with identical
seeds and data order: the same cohorts, the same batches, a fresh AdamW per
client, FedAvg weighted by example count. The plain loop is what a researcher
would write by hand (copy the global LoRA state in, train, average the
deltas); fedfm adds the wire encoding of every broadcast and update, update
validation, the streaming fold and the byte ledger. The script checks that
both end with the same weights, then prints ``fedfm time / plain time`` for
each scenario; the last line is the worst ratio.

    python bench/overhead.py                      # both scenarios of the core issue
    python bench/overhead.py --scenario small     # 500 clients x 1 step only
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import OrderedDict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from fedfm.algorithms.registry import build_algorithm  # noqa: E402
from fedfm.config import load_config  # noqa: E402
from fedfm.data.encode import encode  # noqa: E402
from fedfm.data.sources import load_text_dataset  # noqa: E402
from fedfm.models import build_model  # noqa: E402
from fedfm.models.state import get_state, set_state_  # noqa: E402
from fedfm.build import build_clients  # noqa: E402
from fedfm.client.trainer import LocalTrainer  # noqa: E402
from fedfm.drivers.simulation import sample_cohort, simulation  # noqa: E402
from fedfm.seeds import derive_seed  # noqa: E402

SCENARIOS = {
    # name: (clients, per round, local steps, rounds, target ratio)
    "lora50": (50, 10, 20, 1, 1.10),
    "small": (500, 500, 1, 1, 1.50),
}


def plain_loop(model, params, enc, clients, state0, cohorts, steps, batch_size, lr, seed, task):
    """FedAvg written by hand: no fedfm code except the shared seed formula."""
    global_state = OrderedDict((k, v.clone()) for k, v in state0.items())
    for rnd, cohort in cohorts:
        sums = OrderedDict((k, torch.zeros_like(v, dtype=torch.float64)) for k, v in global_state.items())
        total = 0
        for cid in cohort:
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(global_state[k])
            opt = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=0.0)
            s = derive_seed(seed, rnd, cid)
            torch.manual_seed(s)
            gen = torch.Generator().manual_seed(s)
            rows = torch.as_tensor(clients[cid].train_idx)
            order = rows[torch.randperm(len(rows), generator=gen)]
            pos = 0
            for _ in range(steps):
                if pos >= len(order):
                    order, pos = rows[torch.randperm(len(rows), generator=gen)], 0
                idx = order[pos : pos + batch_size]
                pos += batch_size
                width = int(enc.lengths[idx].max())
                ids, mask = enc.input_ids[idx, :width], enc.attention_mask[idx, :width]
                labels = ids.masked_fill(mask == 0, -100) if task == "causal_lm" else enc.labels[idx]
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            n = len(clients[cid].train_idx)
            with torch.no_grad():
                for k, p in params.items():
                    sums[k].add_((p - global_state[k]).double(), alpha=n)
            total += n
        global_state = OrderedDict((k, global_state[k] + (sums[k] / total).to(v.dtype)) for k, v in global_state.items())
    return global_state


def run_scenario(name: str, repeats: int) -> float:
    num_clients, per_round, steps, rounds, target = SCENARIOS[name]
    cfg = load_config(
        None,
        [
            f"federation.num_clients={num_clients}",
            f"federation.clients_per_round={per_round}",
            f"federation.rounds={rounds}",
            "federation.partition.scheme=iid",
            "federation.partition.min_examples=2",
            f"train.local_steps={steps}",
            "train.batch_size=8",
            "model.max_length=64",
            "data.test_fraction=0.1",
        ],
    )
    ds = load_text_dataset(cfg.data, cfg.model.task, seed=cfg.seed)
    _, clients, _ = build_clients(cfg, ds)
    fm = build_model(cfg.model, len(ds.label_names), seed=cfg.seed)
    enc = encode(ds.texts, fm.tokenizer, cfg.model.max_length, ds.labels)
    state0 = get_state(fm.params)
    cohorts = [(r, sample_cohort(num_clients, per_round, cfg.seed, r)) for r in range(1, rounds + 1)]

    def fedfm_side():
        set_state_(fm.params, state0)
        algo = build_algorithm(cfg.algorithm, num_clients)
        trainer = LocalTrainer(fm, enc, cfg.train, seed=cfg.seed)
        sim = simulation(trainer, algo, clients, per_round, cfg.seed, state0)
        for r in range(1, rounds + 1):
            sim.run_round(r)
        return sim.server.global_state

    def plain_side():
        set_state_(fm.params, state0)
        return plain_loop(
            fm.model, fm.params, enc, clients, state0, cohorts, steps, cfg.train.batch_size, cfg.train.lr, cfg.seed, fm.task
        )

    times = {"fedfm": [], "plain": []}
    results = {}
    for _ in range(repeats):
        for side, fn in (("plain", plain_side), ("fedfm", fedfm_side)):
            t0 = time.perf_counter()
            results[side] = fn()
            times[side].append(time.perf_counter() - t0)
    worst = max(
        float((results["fedfm"][k].double() - results["plain"][k].double()).abs().max()) for k in state0
    )
    if worst > 1e-5:
        raise SystemExit(f"{name}: fedfm and the plain loop disagree (max abs diff {worst:.3g})")
    tf, tp = min(times["fedfm"]), min(times["plain"])
    ratio = tf / tp
    print(
        f"{name}: {num_clients} clients x {per_round}/round x {steps} steps x {rounds} rounds | "
        f"plain {tp:.2f} s, fedfm {tf:.2f} s | same final weights (max diff {worst:.1e}) | "
        f"ratio {ratio:.3f} (target <= {target})",
        flush=True,
    )
    return ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="all")
    ap.add_argument("--repeats", type=int, default=2, help="alternating repeats; the minimum time counts")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    ratios = [run_scenario(n, args.repeats) for n in names]
    print(f"fedfm/plain time ratio: {max(ratios):.3f}")


if __name__ == "__main__":
    main()
