"""Behaviour lock (issue 13, point 6): every feature path ends where it ended before the refactor.

The references in ``tests/golden/`` were recorded by ``python tests/golden.py --record``
on the code before the Server/Client refactor. A run must give the same final
state (sha256 of its tensors) or, where the float summation order legitimately
changed, the same tensors to 1e-6; the same per-round acceptances, versions and
byte counts exactly; and the same losses and accuracies to 1e-6.
"""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from golden import GOLDEN, SCENARIOS, fingerprint

pytestmark = pytest.mark.usefixtures("one_thread")

# integers and ids: exactly; every other value (losses, accuracies, epsilons, virtual times) to 1e-6
EXACT = ("round", "version", "cohort", "accepted", "malicious", "bytes_up", "bytes_down", "bytes_up_total",
         "bytes_down_total", "dropped", "late", "stage", "task")


def close(a, b, tol=1e-6) -> bool:
    """Equal, with floats (also inside dicts and lists) to ``tol``."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], tol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, (int, float)) or isinstance(b, float) and isinstance(a, (int, float)):
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=tol, abs_tol=tol)
    return a == b


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_run_matches_its_recorded_reference(tmp_path, name):
    ref = json.loads((GOLDEN / f"{name}.json").read_text())
    got, state = fingerprint(name, tmp_path)
    if got["sha256"] != ref["sha256"]:
        want = load_file(GOLDEN / f"{name}.safetensors")
        assert list(state) == list(want), "the final state's tensor names changed"
        worst = max(float((state[k].double() - want[k].double()).abs().max()) for k in want)
        assert worst <= 1e-6, f"{name}: final state differs from the reference by {worst:.3g}"
    assert len(got["rounds"]) == len(ref["rounds"])
    for mine, theirs in zip(got["rounds"], ref["rounds"]):
        assert set(mine) == set(theirs), (name, mine["round"])
        for k, v in theirs.items():
            if k in EXACT:
                assert mine[k] == v, (name, mine["round"], k, mine[k], v)
            else:
                assert close(mine[k], v), (name, mine["round"], k, mine[k], v)
    for k, v in ref["summary"].items():
        assert close(got["summary"][k], v), (name, k, got["summary"][k], v)


def test_the_reference_states_are_the_recorded_hashes():
    """The tolerance check compares against the very state whose hash was recorded."""
    from golden import state_digest

    for name in SCENARIOS:
        ref = json.loads((GOLDEN / f"{name}.json").read_text())
        assert state_digest(load_file(GOLDEN / f"{name}.safetensors")) == ref["sha256"], name
        assert all(t.dtype == torch.float32 for t in load_file(GOLDEN / f"{name}.safetensors").values())
