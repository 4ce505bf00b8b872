"""Multi-process simulation on torch.distributed: every worker trains a share of each cohort.

Each worker is one process holding one model instance and one compute
thread. Every round, all workers draw the same cohort, split it by a
deterministic longest-processing-time-first assignment (a client's cost is
its number of local steps, so no worker straggles), train and encode their
own clients, decode, validate and fold their updates into a *partial* fold,
and then:

* all-reduce the folds' running sums (float64) -- one collective of the
  trainable state's size, whatever the cohort size;
* all-gather the few per-client facts the run reports (byte-ledger entries,
  losses, rejections, virtual times) and the private state of the clients
  each worker trained (SCAFFOLD's ``c_i``, error-feedback residuals), as
  safetensors/JSON bytes -- never pickle.

Every worker then finishes the same fold on the same sums, so all hold the
same new global state without a broadcast. Worker 0 alone evaluates and
writes the run folder; the others move on to the next round meanwhile.

Two ways to start workers:

* ``torchrun --nproc-per-node N -m fedfm run CONFIG`` (one or many machines):
  each process builds the run itself and joins the group from torchrun's
  environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...);
* ``fedfm run CONFIG workers=N`` (one machine, default: one per core): the
  run forks ``N - 1`` workers once the model, the tokenized data and the
  clients are built, so the frozen base weights are shared copy-on-write.

A failing forked worker writes its error (one line, plus its traceback) to
``worker-K.json`` in the group's folder before it exits; when the main
process then finds the group broken ("Connection closed by peer"), it waits
a few seconds at most for the workers' reports and raises
``FedfmError("worker K failed: <its error>")``, then stops every worker.

Backend: gloo (CPU). Runs that need every update in one place (robust rules,
FLTrust, colluding attacks, secure aggregation), asynchronous or GPU runs, and
local DP-SGD (its per-client accountants live on the server) stay in one
process. Continual runs split their rounds like one-shot runs: every worker
runs the same stage loop.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections import OrderedDict
from datetime import timedelta
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from fedfm.errors import FedfmError
from fedfm.registry import ALGORITHMS, ATTACKS, COLLUDING, MERGEABLE, NEEDS_ALL_UPDATES, ROBUST_RULES

log = logging.getLogger("fedfm")

TIMEOUT = timedelta(minutes=30)
REPORT_WAIT_S = 10.0  # how long the main process waits for a failed worker's report


def cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def single_process_reason(cfg, device: torch.device | None = None) -> str | None:
    """Why ``cfg`` must run in one process, or None when its rounds can be split across workers."""
    if device is not None and device.type != "cpu":
        return f"the model trains on {device}"
    if cfg.asynchronous.enabled:
        return "asynchronous training"
    if cfg.privacy.secure_aggregation.enabled:
        return "secure aggregation"
    if cfg.privacy.dp_sgd.enabled:
        return "local DP-SGD (per-client accountants)"
    if ROBUST_RULES.supports(cfg.robust.rule, NEEDS_ALL_UPDATES):
        return f"robust.rule={cfg.robust.rule} (needs every update in one place)"
    if ATTACKS.supports(cfg.attack.name, COLLUDING):
        return f"attack {cfg.attack.name} (colludes over the round's benign updates)"
    if not ALGORITHMS.supports(cfg.algorithm.name, MERGEABLE):
        return f"algorithm.name={cfg.algorithm.name} (its fold cannot be split across processes)"
    return None


def resolve_workers(cfg, device: torch.device) -> int:
    """How many workers a run gets: ``cfg.workers``, or one per core (capped by the cohort)."""
    reason = single_process_reason(cfg, device)
    if cfg.workers is not None:
        if cfg.workers > 1 and reason is not None:
            raise FedfmError(f"workers={cfg.workers} is not supported with {reason}; use workers=1")
        return cfg.workers
    if reason is not None:
        return 1
    return max(1, min(cores(), cfg.federation.clients_per_round))


def assign(order: Sequence[int], cost: Callable[[int], float], world: int) -> list[list[int]]:
    """Longest processing time first: each client, costliest first, goes to the least loaded worker.

    Ties break by position in ``order`` and by worker number, so every worker
    computes the same assignment. Each worker's list keeps ``order``'s order.
    """
    pos = {c: i for i, c in enumerate(order)}
    load = [0.0] * world
    shares: list[list[int]] = [[] for _ in range(world)]
    for c in sorted(order, key=lambda c: (-cost(c), pos[c])):
        w = min(range(world), key=lambda r: (load[r], r))
        shares[w].append(c)
        load[w] += cost(c)
    return [sorted(s, key=pos.__getitem__) for s in shares]


class WorkerGroup:
    """This process's place in the group of simulation workers (a gloo process group)."""

    def __init__(self, rank: int, world: int, children: list[int] | None = None, forked: bool = False,
                 store_dir: str | None = None) -> None:
        self.rank = rank
        self.world = world
        self.children = children or []  # pids of forked workers (worker 0 only)
        self.forked = forked
        self.store_dir = store_dir  # the rendezvous file's folder (forked groups; removed by worker 0)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, order: Sequence[int], cost: Callable[[int], float]) -> list[int]:
        return assign(order, cost, self.world)[self.rank]

    # -- collectives ------------------------------------------------------------------
    def sum_tensors(self, tensors: "OrderedDict[str, torch.Tensor]") -> "OrderedDict[str, torch.Tensor]":
        """Element-wise sum over workers of same-shaped float64 tensors (one flat all-reduce)."""
        if not tensors:
            return OrderedDict()
        flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors.values()])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        out, at = OrderedDict(), 0
        for k, t in tensors.items():
            out[k] = flat[at : at + t.numel()].view(t.shape).clone()
            at += t.numel()
        return out

    def gather_bytes(self, blob: bytes) -> list[bytes]:
        """Every worker's ``blob``, in worker order."""
        size = torch.tensor([len(blob)], dtype=torch.int64)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
        dist.all_gather(sizes, size)
        width = int(max(s.item() for s in sizes))
        buf = torch.zeros(width, dtype=torch.uint8)
        if blob:
            buf[: len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        bufs = [torch.zeros(width, dtype=torch.uint8) for _ in range(self.world)]
        dist.all_gather(bufs, buf)
        return [bytes(b[: int(s.item())].numpy().tobytes()) for b, s in zip(bufs, sizes)]

    def barrier(self) -> None:
        dist.barrier()

    def gather_json(self, obj) -> list:
        return [json.loads(b) for b in self.gather_bytes(json.dumps(obj).encode())]

    def close(self) -> None:
        """The run is over: a forked worker exits here; the main process reaps its workers."""
        if self.forked and not self.main:
            finish_worker(0)
        if dist.is_initialized():
            dist.destroy_process_group()
        failures = []
        for rank, pid in enumerate(self.children, start=1):
            _, status = os.waitpid(pid, 0)
            if os.waitstatus_to_exitcode(status) != 0:
                failures.append(self._failure(rank, status))
        self.children = []
        self._remove_store()
        if failures:
            raise FedfmError(failures[0])

    def _remove_store(self) -> None:
        if self.store_dir is not None and self.main:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    # -- failures ---------------------------------------------------------------------
    def _report_path(self, rank: int) -> str | None:
        return None if self.store_dir is None else os.path.join(self.store_dir, f"worker-{rank}.json")

    def _write_report(self, exc: BaseException | None) -> None:
        """A forked worker's last words: its error's one-line summary and traceback (atomic write)."""
        path = self._report_path(self.rank)
        if path is None or exc is None:
            return
        report = {"error": error_line(exc), "collective": broken_group(exc),
                  "traceback": "".join(traceback.format_exception(exc))}
        with contextlib.suppress(OSError):
            with open(path + ".tmp", "w", encoding="utf-8") as fh:
                json.dump(report, fh)
            os.replace(path + ".tmp", path)

    def _read_report(self, rank: int) -> dict | None:
        path = self._report_path(rank)
        try:
            with open(path, encoding="utf-8") as fh:
                return json.load(fh)
        except (OSError, TypeError, ValueError):
            return None

    def _failure(self, rank: int, status: int | None) -> str:
        """``worker K failed: <its error>`` from its report, else from how it exited."""
        report = self._read_report(rank)
        if report is not None:
            log.debug("worker %d: %s", rank, report.get("traceback", ""))
            return f"worker {rank} failed: {report['error']}"
        if status is not None and os.WIFSIGNALED(status):
            name = signal.Signals(os.WTERMSIG(status)).name
            hint = " (out of memory?)" if name == "SIGKILL" else ""
            return f"worker {rank} was killed by {name}{hint}"
        code = None if status is None else os.waitstatus_to_exitcode(status)
        return f"worker {rank} failed (exit code {code}) without a report"

    def worker_failure(self, exc: BaseException) -> str | None:
        """Why the group broke under the main process, when a worker is the cause; None when it is not.

        The main process's own error (anything but a broken collective) is the
        cause itself. Otherwise the workers' reports are awaited, at most
        :data:`REPORT_WAIT_S`: a worker's own error wins over a worker that only
        saw the group break, then a worker that died without a report.
        """
        if not (self.main and self.forked and broken_group(exc)):
            return None
        exited: dict[int, int] = {}
        deadline = time.monotonic() + REPORT_WAIT_S
        while True:
            for rank, pid in enumerate(self.children, start=1):
                if rank not in exited:
                    with contextlib.suppress(ChildProcessError):
                        done, status = os.waitpid(pid, os.WNOHANG)
                        if done:
                            exited[rank] = status
            reports = {r: self._read_report(r) for r in range(1, self.world)}
            own = [r for r, rep in reports.items() if rep is not None and not rep.get("collective")]
            if own:
                return self._failure(own[0], exited.get(own[0]))
            if len(exited) == len(self.children) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        died = [r for r, status in exited.items() if reports.get(r) is None and os.waitstatus_to_exitcode(status) != 0]
        return self._failure(died[0], exited[died[0]]) if died else None

    def fail(self, exc: BaseException | None = None) -> str | None:
        """The run failed in this process with ``exc``: a forked worker reports it and exits (code 1);
        the main process stops its workers and returns a failed worker's error when one caused it."""
        if self.forked and not self.main:
            self._write_report(exc if exc is not None else sys.exc_info()[1])
            finish_worker(1)
        cause = self.worker_failure(exc) if exc is not None else None
        for pid in self.children:
            try:
                os.kill(pid, signal.SIGTERM)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        self.children = []
        if dist.is_initialized():
            dist.destroy_process_group()
        self._remove_store()
        return cause


def broken_group(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective failing because a peer is gone (gloo: "Connection closed by peer")."""
    return isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and "gloo" in str(exc))


def error_line(exc: BaseException) -> str:
    """One line for ``exc``: a :class:`FedfmError`'s message, else ``Type: first line``."""
    lines = str(exc).strip().splitlines()
    if isinstance(exc, FedfmError) and lines:
        return lines[0]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def from_torchrun() -> WorkerGroup | None:
    """The group torchrun started this process in (WORLD_SIZE > 1), or None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=TIMEOUT)  # env:// from torchrun
    return WorkerGroup(dist.get_rank(), dist.get_world_size())


def fork_workers(world: int) -> WorkerGroup:
    """Fork ``world - 1`` workers of this process; returns each process's place in the group.

    Call it once everything read-only is built: the children share those
    pages with the parent until someone writes them (the frozen base never is).
    A child leaves through :meth:`WorkerGroup.close` or :meth:`WorkerGroup.fail`, never by returning.
    """
    folder = tempfile.mkdtemp(prefix="fedfm-workers-")
    store = os.path.join(folder, "store")
    children = []
    for rank in range(1, world):
        pid = os.fork()
        if pid == 0:  # a worker: one compute thread, then join the group
            torch.set_num_threads(1)
            dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                    timeout=TIMEOUT)
            return WorkerGroup(rank, world, forked=True, store_dir=folder)
        children.append(pid)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=world, timeout=TIMEOUT)
    return WorkerGroup(0, world, children=children, forked=True, store_dir=folder)


def finish_worker(code: int) -> None:
    """End a forked worker process without running the parent's exit handlers."""
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    finally:
        os._exit(code)


def threads_before_start(cfg, device: torch.device) -> int | None:
    """The intra-op threads a run may use until :func:`start_workers` (None: torch's default).

    A run that will fork workers stays on one thread until then: a parent that has
    run a multi-threaded OpenMP region before ``fork`` leaves its children a thread
    pool they cannot use (GNU libgomp is not fork-safe), and the first parallel
    operation of a worker then waits forever (seen: the default job with
    ``threads=2 workers=2`` hung in its first embedding). Threads are set for
    good after the fork.
    """
    if from_torchrun_env() or resolve_workers(cfg, device) <= 1:
        return cfg.threads
    return 1


def from_torchrun_env() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start_workers(cfg, device: torch.device) -> WorkerGroup | None:
    """Join torchrun's group, or fork ``workers - 1`` workers; None when the run stays in one process."""
    group = from_torchrun()
    if group is not None:
        reason = single_process_reason(cfg, device)
        if reason is not None:
            raise FedfmError(f"torchrun with {group.world} processes is not supported with {reason}")
    else:
        n = resolve_workers(cfg, device)
        if n <= 1:
            return None
        group = fork_workers(n)
    torch.set_num_threads(cfg.threads or 1)  # one compute thread per worker unless threads= says otherwise
    return group


def is_main_process() -> bool:
    """False in torchrun's processes other than rank 0 (they write nothing to the run folder)."""
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def evaluation(group, threads: int | None):
    """Every worker enters; the main one evaluates on every core while the others wait at a barrier.

    (Letting the others train the next round meanwhile oversubscribes the cores:
    measured on the default job, each evaluation took twice as long.)
    """
    if group is None:
        yield
        return
    before = torch.get_num_threads()
    if group.main:
        torch.set_num_threads(threads or cores())
    try:
        yield
    finally:
        torch.set_num_threads(before)
        group.barrier()


def run_in_group(group: WorkerGroup | None, loop: Callable[[], object]):
    """Run ``loop()`` in this process of the group: a failure stops the group, the end closes it.

    A forked worker leaves the process inside :meth:`WorkerGroup.close` or
    :meth:`WorkerGroup.fail`; torchrun's other ranks return here with the result.
    When the main process fails because a forked worker did, it raises
    :class:`FedfmError` ``worker K failed: <its error>``.
    """
    try:
        result = loop()
    except BaseException as exc:
        cause = group.fail(exc) if group is not None else None  # a forked worker leaves in fail()
        if cause is not None:  # the main process saw the group break because a worker failed
            raise FedfmError(cause) from exc
        raise
    if group is not None:
        group.close()  # a forked worker leaves here
    return result
