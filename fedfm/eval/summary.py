"""What a run writes about itself: the final state's metadata and summary.json's common block."""

from __future__ import annotations

import json
from pathlib import Path

from fedfm.compression.report import compression_summary
from fedfm.config import RunConfig
from fedfm.data.quality import quality_table
from fedfm.models.chain import base_name
from fedfm.models.state import state_nbytes


def state_metadata(cfg: RunConfig, num_labels: int | None, label_names, version: int) -> dict[str, str]:
    """The safetensors metadata of a run's final state: what base, task and labels it belongs to."""
    return {
        "model": base_name(cfg.model),
        "task": cfg.model.task,
        "method": cfg.model.method,
        "num_labels": str(num_labels or 0),
        "label_names": json.dumps(label_names or []),
        "version": str(version),
    }


def make_summary(cfg: RunConfig, records: list[dict], server, sim, trainable: int, total: int, wall: float,
                 out: Path) -> dict:
    last = records[-1]
    key = "perplexity" if cfg.model.task == "causal_lm" else "accuracy"
    final = {k: v for k, v in last.items() if k.startswith(("test_", "client_"))}
    return {
        "name": cfg.name,
        "task": cfg.model.task,
        "model": base_name(cfg.model),
        "method": cfg.model.method,
        "start_from": cfg.model.start_from,
        "algorithm": cfg.algorithm.name,
        "num_clients": cfg.federation.num_clients,
        "clients_per_round": cfg.federation.clients_per_round,
        "rounds": last["round"],
        "final_version": server.version,
        "metric": key,
        f"final_{key}": last.get(f"test_{key}"),
        # the majority-class baseline: always the most frequent training label (fedfm.eval.baseline)
        **({"prior_accuracy": last["test_prior_accuracy"]} if "test_prior_accuracy" in last else {}),
        **({"backdoor_success_rate": last["backdoor_success_rate"]} if "backdoor_success_rate" in last else {}),
        "final": final,
        **client_block(cfg, last, key, out),
        "bytes_down_total": server.ledger.total["down"],
        "bytes_up_total": server.ledger.total["up"],
        "trainable_params": trainable,
        "total_params": total,
        "trainable_state_bytes": state_nbytes(server.global_state),
        # upload bytes and compression factors vs the full float32 model and the trainable state
        "compression": compression_summary(cfg, server, total, state_nbytes(server.global_state)),
        "rejected_updates": len(server.rejected),
        # data.quality: each client's latest reported counts (rows, kept, dropped by reason)
        **({"data_quality": quality_table(server.quality)} if getattr(server, "quality", None) else {}),
        "attack": cfg.attack.name,
        "malicious_clients": sorted(sim.malicious),
        "robust_rule": cfg.robust.rule,
        "wall_s": wall,
        "run_dir": str(out),
        "state_file": str(out / "final_state.safetensors"),
    }


def client_block(cfg: RunConfig, last: dict, key: str, out: Path) -> dict:
    """The last evaluation per client, with the group values (user ids) each holds in a natural partition.

    The groups come from the run's partition.json (``client_groups``); the
    counts say how many clients the ``client_*`` statistics left out for having
    fewer than ``eval.min_client_test_examples`` local test rows.
    """
    if "per_client" not in last:
        return {}
    groups = {}
    part = Path(out) / "partition.json"
    if part.is_file():
        groups = json.loads(part.read_text()).get("client_groups") or {}
    per = {cid: {key: v, **({"groups": groups[cid]} if cid in groups else {})} for cid, v in last["per_client"].items()}
    return {
        "per_client": per,
        "min_client_test_examples": cfg.eval.min_client_test_examples,
        "clients_counted": last.get("clients_counted"),
        "clients_too_small": last.get("clients_too_small"),
    }
