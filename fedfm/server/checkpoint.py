"""Numbered global-model checkpoints, written atomically, and resuming a killed run.

After every ``checkpoint.every``-th round the runner writes version ``v`` of
the global model together with everything the next round depends on:

* ``RUN_DIR/checkpoints/v{v:06d}.safetensors`` — every tensor: the server's
  (:meth:`fedfm.server.server.Server.state_dict`: the global trainable state,
  the server optimizer's moments, SCAFFOLD's ``c`` ...), those of the
  sections the caller adds (each client's private persistent tensors,
  ``Client.state``; an asynchronous run's uploads in flight; the continual
  loop's replay rows ...) and the torch / numpy RNG states;
* ``RUN_DIR/checkpoints/v{v:06d}.json`` — everything else, as JSON: the run
  id (:mod:`fedfm.run_folder`), round, version, the server's JSON state (fold
  counters, accountant, byte ledger, rejected updates), each section's JSON, the number of ``metrics.jsonl``
  lines written, python's RNG state, the key order of every tensor group,
  and the SHA-256 of the tensor file.

No pickle anywhere. Each file is written under a temporary name, flushed to
disk and moved into place with :func:`os.replace` (atomic on POSIX and
Windows), tensors first and the JSON last: the JSON is the commit record, so
a kill at any instant leaves either the previous checkpoint or the new one,
never a partial one that would be loaded (an orphan tensor file without its
JSON is ignored and cleaned up by the next write). Loading checks the hash.
Pruning, orphan clean-up and resuming only ever touch checkpoints carrying
the run folder's own run id (the tensor file carries it in its metadata).

Resuming (``fedfm run --resume RUN_DIR``) rebuilds the run from its own
``config.yaml`` exactly as a fresh run does (same seed → same data split,
model initialisation and tokenization), then restores the latest checkpoint
over it and continues with the next round. Client sampling and local-training
seeds are derived from ``(seed, round, client)`` (DP noise too with
``privacy.reproducible_noise``; by default it comes from OS entropy and no
checkpoint holds a state that reconstructs it), and the restored tensors are
bit-exact, so on CPU the resumed run ends with the same final model, bit for
bit, as an uninterrupted one (a default DP run: the same privacy accounting,
fresh noise). This is the same recipe
as checkpointing in centralized training (model + optimizer + RNG state),
applied to the server *and* to the clients' private state.

A damaged latest checkpoint (hash mismatch, unreadable JSON or tensors) is
skipped, with one logged line, for the newest intact one (with
``checkpoint.keep >= 2``); metrics.jsonl is truncated to the checkpoint
actually used. Overrides given with ``--resume`` are applied on top of the
run's own config: only keys that really change are refused.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import random
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from fedfm import run_folder
from fedfm.config import resolve_config, to_dict, validate
from fedfm.config.load import apply_overrides
from fedfm.errors import FedfmError

log = logging.getLogger("fedfm")

FORMAT = 2
CKPT_DIR = "checkpoints"


def checkpoint_dir(run_dir) -> Path:
    return Path(run_dir) / CKPT_DIR


def _name(version: int) -> str:
    return f"v{version:06d}"


# -- atomic files ---------------------------------------------------------------
def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)``, fsync the result, then ``os.replace`` it onto ``path``.

    A crash before the replace leaves ``path`` untouched (old content or
    absent) plus a stray ``*.tmp`` file; after it, ``path`` is complete.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # make the rename itself durable (best effort: not every platform can fsync a folder)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


# -- what a run's state consists of ---------------------------------------------
def _rng_state(tensors: dict) -> dict:
    tensors["rng/torch"] = torch.get_rng_state()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng/numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss_next = random.getstate()
    return {
        "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
    }


def _set_rng_state(tensors: Mapping[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    n = meta["numpy"]
    keys = tensors["rng/numpy"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = meta["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


# -- the checkpointer -----------------------------------------------------------
class Checkpointer:
    """Writes the latest ``keep`` checkpoints of a run every ``every`` rounds (0: never).

    Every checkpoint carries the folder's run id (:func:`fedfm.run_folder.run_id`); pruning
    and orphan clean-up only touch this run's files, and a checkpoint of another run is
    never overwritten.
    """

    def __init__(self, run_dir, every: int = 1, keep: int = 1, sections=None) -> None:
        self.dir = checkpoint_dir(run_dir)
        self.every = int(every)
        self.keep = int(keep)
        self.sections = dict(sections or {})  # written into every checkpoint (see save)
        self.run_id = run_folder.run_id(run_dir)  # None in a folder from before run ids

    def due(self, round_idx: int) -> bool:
        return self.every > 0 and round_idx % self.every == 0

    def save(self, round_idx: int, server, metrics_lines: int, sections=None) -> Path:
        """Write checkpoint ``v{server.version}`` atomically; returns its JSON path.

        ``sections`` (added to those given at construction) maps a name to
        ``write(tensors, orders) -> JSON`` for a caller's own state (the clients' private
        states, an asynchronous run's clients in flight, the continual loop's stage ...):
        its tensors go into the tensor file, its JSON under ``meta[name]``; read it back with
        :func:`section`. An OS error (full disk, read-only folder) is a one-line error.
        """
        tensors: dict[str, torch.Tensor] = {}
        orders: dict[str, list[str]] = {}
        meta = {
            "format": FORMAT,
            "run_id": self.run_id,
            "round": int(round_idx),
            "version": int(server.version),
            "metrics_lines": int(metrics_lines),
            "server": server.state_dict(tensors, orders),
        }
        for name, write in {**self.sections, **(sections or {})}.items():
            meta[name] = write(tensors, orders)
        meta["rng"] = _rng_state(tensors)
        meta["orders"] = orders
        json_path = self.dir / f"{_name(server.version)}.json"
        try:
            self._write(json_path, meta, tensors)
            self._prune()
        except (OSError, SafetensorError) as err:
            raise FedfmError(_write_error(err, json_path)) from None
        return json_path

    def _write(self, json_path: Path, meta: dict, tensors: dict) -> None:
        """The tensor file, then its JSON (the commit record), each atomically."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if json_path.is_file() and _run_of(json_path) not in (self.run_id, _UNREADABLE):
            raise FedfmError(f"{json_path} belongs to another run (run id {_run_of(json_path)}); "
                             "move it out of this run folder")
        st_path = json_path.with_suffix(".safetensors")
        stamp = {"run_id": str(self.run_id)}
        atomic_write(st_path, lambda tmp: save_file(tensors, str(tmp), metadata=stamp))
        meta["tensors_file"] = st_path.name
        meta["tensors_sha256"] = _sha256(st_path)
        atomic_write(json_path, lambda tmp: Path(tmp).write_text(json.dumps(meta, default=float)))

    def _prune(self) -> None:
        """Drop this run's checkpoints beyond the newest ``keep``, and its orphan tensor files."""
        mine = own_checkpoints(self.dir.parent, self.run_id)
        for old in mine[: max(0, len(mine) - self.keep)]:
            old.unlink()
            old.with_suffix(".safetensors").unlink(missing_ok=True)
        live = {p.stem for p in self.dir.glob("v*.json")}
        for orphan in self.dir.glob("v*.safetensors"):  # a tensor file whose JSON never landed
            if orphan.stem not in live and _tensor_run_of(orphan) == str(self.run_id):
                orphan.unlink()


_UNREADABLE = object()  # the run id of a checkpoint JSON that cannot be read


def _run_of(json_path: Path):
    """The run id a checkpoint JSON names (None: written before run ids), or ``_UNREADABLE``."""
    try:
        meta = json.loads(Path(json_path).read_text())
        return meta.get("run_id") if isinstance(meta, dict) else _UNREADABLE
    except (OSError, ValueError):
        return _UNREADABLE


def _tensor_run_of(st_path: Path) -> str | None:
    """The run id stamped into a tensor file's metadata (None when unreadable)."""
    try:
        with safe_open(str(st_path), "pt") as fh:
            return (fh.metadata() or {}).get("run_id")
    except (SafetensorError, OSError, ValueError):
        return None


def _write_error(err: Exception, path: Path) -> str:
    cause = (err.strerror or str(err)) if isinstance(err, OSError) else str(err)
    return f"cannot write checkpoint {path}: {cause}"


def own_checkpoints(run_dir, run_id) -> list[Path]:
    """The committed checkpoint JSONs of run ``run_id`` in ``run_dir``, oldest first."""
    d = checkpoint_dir(run_dir)
    found = sorted(d.glob("v*.json")) if d.is_dir() else []
    return [p for p in found if _run_of(p) == run_id]


def latest(run_dir) -> Path | None:
    """The JSON of the folder's run's newest committed checkpoint, or None when none was written yet."""
    mine = own_checkpoints(run_dir, run_folder.run_id(run_dir))
    return mine[-1] if mine else None


def load(json_path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and verify one checkpoint: ``(meta, tensors)``; a damaged one is a one-line error."""
    try:
        meta = json.loads(Path(json_path).read_text())
        st_path = Path(json_path).with_name(meta["tensors_file"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise FedfmError(f"corrupt checkpoint {json_path}: {err}") from None
    if meta.get("format") != FORMAT:
        raise FedfmError(f"checkpoint {json_path} has format {meta.get('format')!r}, this fedfm reads {FORMAT}")
    if not st_path.is_file():
        raise FedfmError(f"checkpoint {json_path} is missing its tensor file {st_path.name}")
    if _sha256(st_path) != meta.get("tensors_sha256"):
        raise FedfmError(f"corrupt checkpoint {st_path}: its SHA-256 does not match {Path(json_path).name}")
    try:
        tensors = load_file(str(st_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise FedfmError(f"corrupt checkpoint {st_path}: {err}") from None
    return meta, tensors


def restore(meta: dict, tensors, server, loaders=None) -> None:
    """Put a loaded checkpoint back into a freshly built run (same config, same seed).

    ``loaders`` maps a section name to ``load(json, tensors, orders)``; the RNG states go last.
    """
    orders = meta["orders"]
    server.load_state_dict(meta["server"], tensors, orders)
    for name, load_section in (loaders or {}).items():
        load_section(section(meta, name), tensors, orders)
    _set_rng_state(tensors, meta["rng"])


def section(meta: dict, name: str):
    """A caller's section of a loaded checkpoint (written through ``Checkpointer.save``'s ``sections``)."""
    if meta.get(name) is None:
        raise FedfmError(f"the checkpoint has no {name!r} section: it was not written by this kind of run")
    return meta[name]


def load_for_resume(run_dir, resume, every: int) -> tuple[dict, dict[str, torch.Tensor], list[dict]] | None:
    """``(meta, tensors, kept metrics records)`` of the run's newest intact checkpoint when ``resume`` is set.

    None when not resuming, or when the killed run wrote no checkpoint yet (it
    starts over); a one-line error when it ran with ``checkpoint.every=0``.
    Only checkpoints of the folder's own run id count. A damaged checkpoint
    (hash mismatch, unreadable JSON or tensors) is skipped with one logged
    line for the previous intact one; when none is intact, the newest one's
    error is raised.
    """
    if resume is None:
        return None
    candidates = _resume_candidates(run_dir)
    if not candidates:
        if every == 0:
            raise FedfmError(f"cannot resume {run_dir}: it ran with checkpoint.every=0 (no checkpoints)")
        return None
    first_error = None
    for path in reversed(candidates):
        try:
            meta, tensors = load(path)
        except FedfmError as err:
            first_error = first_error or err
            log.warning("resume: skipping checkpoint %s: %s", path.name, err)
            continue
        return meta, tensors, kept_metrics(run_dir, meta["metrics_lines"])
    raise FedfmError(f"{first_error} (no intact earlier checkpoint of this run)")


def _resume_candidates(run_dir) -> list[Path]:
    """This run's checkpoint JSONs, oldest first, plus unreadable ones (damaged; whose, no one can tell)."""
    d = checkpoint_dir(run_dir)
    mine = run_folder.run_id(run_dir)
    return [p for p in sorted(d.glob("v*.json")) if _run_of(p) in (mine, _UNREADABLE)] if d.is_dir() else []


def kept_metrics(run_dir, lines: int) -> list[dict]:
    """The first ``lines`` records of ``metrics.jsonl`` (those the checkpoint had written)."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = path.read_text().splitlines() if path.is_file() else []
    if len(rows) < lines:
        raise FedfmError(f"{path} has {len(rows)} records but the checkpoint needs {lines}; cannot resume")
    return [json.loads(r) for r in rows[:lines]]


# -- which config a resumed run uses --------------------------------------------
IGNORED = ("progress", "out")  # may differ between the killed run and the resume


def resume_config(run_dir, config=None, overrides=()):
    """The run's own ``config.yaml`` (with ``out = run_dir``); a different config given is refused.

    ``overrides`` are applied on top of the run's own config (or of ``config`` when one is
    given) and compared with it: only keys that really change are refused, and ``progress``
    and ``out`` may always change.
    """
    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise FedfmError(f"cannot resume {run_dir}: no config.yaml there (not a run folder)")
    if (run_dir / "summary.json").is_file():
        raise FedfmError(f"{run_dir} already finished (summary.json exists); nothing to resume")
    try:
        saved = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise FedfmError(f"cannot resume {run_dir}: config.yaml is not valid YAML ({err})") from None
    mine = to_dict(validate(saved))
    overrides = list(overrides)
    if config is not None or overrides:
        given = to_dict(resolve_config(copy.deepcopy(mine) if config is None else config, overrides))
        diff = sorted(k for k in _diff(mine, given) if k not in IGNORED)
        if diff:
            shown = ", ".join(diff[:5]) + (" …" if len(diff) > 5 else "")
            raise FedfmError(
                f"--resume uses {path}; the config given differs in {shown} (pass no config to resume)"
            )
    progress = [o for o in overrides if o.split("=", 1)[0].strip() == "progress"]
    mine["out"] = str(run_dir)
    return validate(apply_overrides(mine, progress))


def _diff(a, b, prefix: str = "") -> set[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = set()
        for k in set(a) | set(b):
            out |= _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return set() if a == b else {prefix.rstrip(".")}
