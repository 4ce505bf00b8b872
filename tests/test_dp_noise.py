"""DP noise comes from OS entropy unless ``privacy.reproducible_noise`` (fedfm/privacy/noise.py).

Two runs with the same seed must draw different noise by default (the seed is
public: it is in the config) and identical noise only when asked for; no
checkpoint holds a generator state that reconstructs past noise; the
accountants do not care where the noise came from; and a resumed run works
either way (bit-identical only with reproducible noise).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import fedfm
from fedfm.algorithms.base import Update
from fedfm.privacy.client_dp import ClientDPFold
from fedfm.privacy.dp_sgd import LocalDPSGD, SampleLevelAccountant, poisson_sample
from fedfm.server import checkpoint
from test_dp_sgd import TEXTS, tiny
from test_end_to_end import tiny_cls_overrides

pytestmark = pytest.mark.usefixtures("one_thread")


# -- client-level DP: update noise and adaptive-clipping bit noise -------------------------------
def client_dp_draws(reproducible: bool, rounds: int = 2) -> tuple[list[torch.Tensor], list[float]]:
    """The noised means and next clip norms of ``rounds`` rounds of an adaptive fold with seed 7."""
    fold = ClientDPFold(clip_norm=1.0, noise_multiplier=0.5, expected_clients=10, adaptive=True, seed=7,
                        reproducible=reproducible)
    means, clips = [], []
    for _ in range(rounds):
        torch.manual_seed(0)  # the global generator (checkpointed) must play no part
        fold.start({"w": torch.zeros(4)})
        fold.add(Update(client_id=0, delta={"w": torch.full((4,), 0.1)}, num_examples=1))
        means.append(fold.finish()["w"].clone())
        clips.append(fold.clip_norm)
    return means, clips


def test_client_dp_noise_differs_between_same_seed_folds_unless_reproducible():
    (a, ca), (b, cb) = client_dp_draws(False), client_dp_draws(False)
    assert not torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])  # update noise
    assert ca[0] != cb[0]  # the adaptive clip norm moved by the bit noise
    (x, cx), (y, cy) = client_dp_draws(True), client_dp_draws(True)
    assert all(torch.equal(u, v) for u, v in zip(x, y)) and cx == cy
    assert not torch.equal(x[0], x[1])  # still fresh noise every round


def test_simulation_workers_agree_on_the_entropy_noise_of_a_round():
    """Each worker finishes the fold itself: the shares in ``partial`` give them all one entropy seed."""
    workers = [ClientDPFold(noise_multiplier=1.0, expected_clients=2, seed=7) for _ in range(2)]
    outs = []
    for _ in range(2):
        for w, value in zip(workers, (0.1, -0.3)):
            w.start({"w": torch.zeros(3)})
            w.add(Update(client_id=0, delta={"w": torch.full((3,), value)}, num_examples=1))
        partials = [w.partial() for w in workers]
        total = {"w": partials[0][0]["w"] + partials[1][0]["w"]}
        for w in workers:
            w.merge(total, [scalars for _, scalars in partials])
        outs.append([w.finish()["w"].clone() for w in workers])
    assert all(torch.equal(a, b) for a, b in outs)  # the same noise on every worker
    assert not torch.equal(outs[0][0], outs[1][0])


def test_client_dp_state_dict_holds_no_generator_state():
    fold = ClientDPFold(noise_multiplier=1.0, expected_clients=2, seed=7)
    fold.start({"w": torch.zeros(2)})
    fold.finish()
    assert set(fold.state_dict()) == {"clip_norm", "rounds"}


# -- DP-SGD: Poisson batches and gradient noise ---------------------------------------------------
@pytest.fixture(scope="module")
def model():
    return tiny()


def dp_sgd_grad(model, reproducible: bool, sigma: float = 1.0) -> torch.Tensor:
    """The noised gradient of one DP-SGD step of client 0 with session seed 5 (q = 1: only the noise varies)."""
    fm, enc = model
    n = len(TEXTS)
    dp = LocalDPSGD(fm, enc, SampleLevelAccountant(sigma, {0: n}, n), max_grad_norm=0.5, engine="loop",
                    reproducible=reproducible)
    torch.manual_seed(0)
    dp.session(0, np.arange(n), 1, seed=5).step()
    return torch.cat([p.grad.flatten() for p in fm.params.values()]).clone()


def test_dp_sgd_noise_differs_between_same_seed_sessions_unless_reproducible(model):
    assert not torch.equal(dp_sgd_grad(model, False), dp_sgd_grad(model, False))
    assert torch.equal(dp_sgd_grad(model, True), dp_sgd_grad(model, True))


def test_dp_sgd_poisson_batches_come_from_os_entropy_unless_reproducible(model):
    """Amplification by subsampling needs secret batches: they differ between same-seed sessions by default."""
    fm, enc = model
    n = len(TEXTS)

    def batches(reproducible):
        dp = LocalDPSGD(fm, enc, SampleLevelAccountant(0.0, {0: n}, 4), reproducible=reproducible)
        sess = dp.session(0, np.arange(n), 8, seed=5)
        return [poisson_sample(sess.rows, sess.q, sess.batch_gen).tolist() for _ in range(8)]

    assert batches(True) == batches(True)
    assert batches(False) != batches(False)  # 8 draws of 8 rows at q = 1/2: equal with chance 2^-64


# -- whole runs: checkpoints, the accountants, resume ---------------------------------------------
DP_RUN = {
    "model.method": "lora",
    "federation.rounds": 2,
    "train.local_steps": 2,
    "train.batch_size": 4,
    "eval.every": 0,
    "eval.clients": False,
    "threads": 1,
    "workers": 1,
    "checkpoint.every": 1,
    "checkpoint.keep": 2,
    "privacy.client_dp.enabled": True,
    "privacy.client_dp.noise_multiplier": 0.25,  # adaptive: z < 2·σ_b = 2·(3/20)
    "privacy.client_dp.adaptive": True,
    "privacy.dp_sgd.enabled": True,
    "privacy.dp_sgd.noise_multiplier": 1.0,
}


class Captured(logging.Handler):
    """The fedfm log's warnings, as text."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def run_and_resume(tmp: Path, reproducible: bool) -> dict:
    """Run DP_RUN, then drop its last checkpoint and summary and resume it from the one before."""
    run_dir = tmp / f"reproducible_{reproducible}"
    over = tiny_cls_overrides(tmp, **DP_RUN, out=run_dir, **{"privacy.reproducible_noise": reproducible})
    log, captured = logging.getLogger("fedfm"), Captured()
    log.addHandler(captured)
    try:
        summary = fedfm.run(None, over)
    finally:
        log.removeHandler(captured)
    first = load_file(run_dir / "final_state.safetensors")
    last = checkpoint.latest(run_dir)
    meta, tensors = checkpoint.load(last)
    for path in (run_dir / "summary.json", last, last.with_suffix(".safetensors")):
        path.unlink()
    resumed = fedfm.run(resume=run_dir)
    again = load_file(run_dir / "final_state.safetensors")
    return dict(summary=summary, resumed=resumed, first=first, again=again, meta=meta, tensors=tensors,
                warnings="\n".join(captured.lines))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    """The same DP run (client-level DP and DP-SGD, same seed) by default and with reproducible noise."""
    tmp = tmp_path_factory.mktemp("dp_noise")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("fedfm.runner.plot_metrics", lambda *a, **k: None)  # half a run's time, and beside the point
        yield {mode: run_and_resume(tmp, mode) for mode in (False, True)}


def key_paths(tree, prefix="") -> list[str]:
    """Every key path of a JSON tree, as ``a/b/c``."""
    if not isinstance(tree, dict):
        return []
    out = []
    for k, v in tree.items():
        out += [f"{prefix}{k}", *key_paths(v, f"{prefix}{k}/")]
    return out


def test_a_default_dp_checkpoint_holds_no_noise_seed_or_generator_state(runs):
    meta, tensors = runs[False]["meta"], runs[False]["tensors"]
    assert set(meta["server"]["fold"]["state"]) == {"clip_norm", "rounds"}  # counts and parameters only
    assert set(meta["dp_sgd"]) == {"accountant", "skipped_total"}
    paths = key_paths(meta) + list(tensors)
    assert not [p for p in paths if "seed" in p.lower() or "generator" in p.lower()]
    assert all(p.startswith("rng") for p in paths if "rng" in p.lower())  # the global RNGs, which DP never uses


def test_a_default_dp_run_resumes_with_fresh_noise_and_the_same_privacy_spent(runs):
    r = runs[False]
    assert r["resumed"]["privacy"] == r["summary"]["privacy"]
    assert r["resumed"]["final_version"] == r["summary"]["final_version"] == 2
    assert any(not torch.equal(r["first"][k], r["again"][k]) for k in r["first"])
    assert "reproducible_noise" not in r["warnings"]


def test_a_reproducible_dp_run_warns_and_resumes_bit_identical(runs):
    r = runs[True]
    assert "privacy.client_dp: privacy.reproducible_noise=true" in r["warnings"]
    assert "privacy.dp_sgd: privacy.reproducible_noise=true" in r["warnings"]
    assert "NOT private against anyone who has its config" in r["warnings"]
    assert all(torch.equal(r["first"][k], r["again"][k]) for k in r["first"])
    assert r["resumed"]["privacy"] == r["summary"]["privacy"]


def test_the_accountants_spend_the_same_epsilon_either_way(runs):
    default, reproducible = runs[False]["summary"]["privacy"], runs[True]["summary"]["privacy"]
    assert default["epsilon"] == reproducible["epsilon"] > 0
    assert default["dp_sgd"] == reproducible["dp_sgd"]
    assert any(not torch.equal(runs[False]["first"][k], runs[True]["first"][k]) for k in runs[True]["first"])
