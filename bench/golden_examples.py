"""The shipped examples, shrunk to a couple of rounds, against their recorded final states.

    python bench/golden_examples.py            # compare with bench/golden_examples.json
    python bench/golden_examples.py --record   # (re)write it

The tiny-model twin of this check runs in the test suite (tests/test_golden.py);
this one uses the real packaged models and BBC News, so it takes minutes and
lives here. Prints, per example, whether the final state's sha256 is the
recorded one and the largest difference in the final metrics.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from golden import state_digest  # noqa: E402

RECORD = Path(__file__).with_name("golden_examples.json")
SHRINK = ["federation.rounds=2", "eval.every=0", "eval.clients=false", "progress=false", "threads=2",
          "eval.max_test_examples=200"]
EXAMPLES = {
    "default": ("examples/default.yaml", ["workers=1"]),
    "scaffold": ("examples/full_finetune_scaffold.yaml", ["workers=1", "train.local_steps=2"]),
    "fedadam_client_dp": ("examples/dp.yaml", ["workers=1", "algorithm.name=fedadam", "algorithm.server_lr=0.01",
                                                "privacy.client_dp.target_epsilon=null",
                                                "privacy.client_dp.noise_multiplier=0.5",
                                                "privacy.reproducible_noise=true"]),
    "secagg": ("examples/secagg.yaml", ["workers=1"]),
    "int8_error_feedback": ("examples/compress.yaml", ["workers=1", "compression.error_feedback=true"]),
    "trimmed_mean_attack": ("examples/robust.yaml", ["workers=1"]),
    "fedbuff": ("examples/async.yaml", ["workers=1", "federation.rounds=3"]),
    "continual_replay": ("examples/continual.yaml", ["continual.rounds_per_stage=1"]),
    "workers2": ("examples/default.yaml", ["workers=2", "threads=1"]),  # as recorded before the refactor
}


def run_one(name: str) -> dict:
    """Run one example in a process of its own (``fedfm run``), like a user would."""
    from safetensors.torch import load_file

    path, extra = EXAMPLES[name]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "fedfm", "run", str(ROOT / path), *SHRINK, *extra, f"out={tmp}/run"]
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        summary = json.loads((Path(tmp) / "run" / "summary.json").read_text())
        state = load_file(Path(tmp) / "run" / "final_state.safetensors")
    keys = ("final_accuracy", "final_version", "bytes_up_total", "bytes_down_total", "rejected_updates")
    return {"sha256": state_digest(state), **{k: summary.get(k) for k in keys}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--record", action="store_true")
    ap.add_argument("names", nargs="*", default=list(EXAMPLES))
    args = ap.parse_args()
    recorded = json.loads(RECORD.read_text()) if RECORD.is_file() else {}
    bad = 0
    for name in args.names:
        got = run_one(name)
        if args.record:
            recorded[name] = got
            RECORD.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
            print(f"{name}: recorded {got['sha256'][:16]}", flush=True)
            continue
        want = recorded[name]
        same = got["sha256"] == want["sha256"]
        diffs = {k: (got[k], want[k]) for k in want if k != "sha256" and got[k] != want[k]}
        bad += (not same) or bool(diffs)
        print(f"{name}: sha256 {'same' if same else 'DIFFERENT'}; metric differences: {diffs or 'none'}", flush=True)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
