"""A run folder belongs to one run: an exclusive lock, a run id, and a start that leaves nothing behind.

:func:`claim` is the first thing a run does to its folder (``fedfm run``, the
continual loop it drives, the forked simulation workers, the deployed server):

* **lock**: ``RUN_DIR/.lock`` is locked with ``flock(LOCK_EX | LOCK_NB)`` for
  the run's whole life and holds the owner's pid. A second run on the same
  folder fails at once with one line. The kernel drops the lock when the
  owner's last descriptor closes, so a run killed with ``kill -9`` leaves no
  stale lock; forked workers share the owner's descriptor, so the folder stays
  locked until the last of them is gone. The owner removes the lock file
  when it releases the lock (a locker checks that the file it locked is still
  the one at ``.lock``, and retries otherwise).
* **one run per folder**: a new run refuses a folder that already holds
  anything, unless it is ``--resume`` of that run or ``overwrite`` (the
  folder is cleared, only once the lock is held). An unnamed run
  (``unique``) takes ``NAME-STAMP``, or ``NAME-STAMP-2`` ... when that exists.
* **run id**: a new run writes ``RUN_DIR/run.json`` with a fresh uuid4;
  every checkpoint carries it (:mod:`fedfm.server.checkpoint`), and pruning
  and resuming only ever touch checkpoints of their own run id. A folder
  from before run ids has none (:func:`run_id` is None, as are its
  checkpoints' ids).
* **clean failed start**: until the caller says :meth:`RunFolder.started`
  (data and model loaded), an exception removes what this start created: the
  folder when it did not exist, else only the entries that were not there.

:func:`io_errors` turns an OS error on the run folder (read-only folder, full
disk) into a one-line :class:`~fedfm.errors.FedfmError` naming the path.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path

from fedfm.errors import FedfmError

LOCK_FILE = ".lock"
RUN_FILE = "run.json"


def run_id(run_dir) -> str | None:
    """The run id of ``run_dir`` (its ``run.json``), or None for a folder without one."""
    path = Path(run_dir) / RUN_FILE
    try:
        return json.loads(path.read_text())["run_id"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise FedfmError(f"cannot read the run id in {path}: {err}") from None


class RunFolder:
    """A claimed run folder (see the module docstring); a context manager that releases it."""

    def __init__(self, path: Path, fd: int | None, created: list[Path], before: set[str]) -> None:
        self.path = path
        self._fd = fd  # None: nothing claimed (a torchrun rank other than 0)
        self._pid = os.getpid()  # forked workers inherit the object: only the owner releases
        self._created = created  # folders this start made, innermost first
        self._before = before  # the folder's entries before this start
        self._started = False

    def started(self) -> None:
        """The run is built: from now on a failure keeps the folder (its checkpoints resume it)."""
        self._started = True

    def abandon(self) -> None:
        """Remove what this start created in the folder (never anything that was there before)."""
        if self._fd is None or os.getpid() != self._pid:
            return
        if self._created and self._created[0] == self.path:
            shutil.rmtree(self.path, ignore_errors=True)  # ours alone: we hold its lock
            _remove_empty(self._created[1:])
            return
        for name in set(os.listdir(self.path)) - self._before - {LOCK_FILE}:
            _remove(self.path / name)

    def release(self) -> None:
        """Unlock the folder (the owner process only; idempotent)."""
        if self._fd is None or os.getpid() != self._pid:
            return
        with contextlib.suppress(OSError):
            (self.path / LOCK_FILE).unlink()
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, kind, err, tb) -> None:
        try:
            if kind is not None and not self._started:
                with contextlib.suppress(OSError):  # never hide the error that failed the start
                    self.abandon()
        finally:
            self.release()


def claim(path, *, resume: bool = False, overwrite: bool = False, unique: bool = False,
          lock: bool = True) -> RunFolder:
    """Lock the run folder ``path`` for this run (module docstring); a one-line error when it cannot.

    ``resume``: continue the run already in it; ``overwrite``: clear what it holds;
    ``unique``: take ``path`` or, when it exists, the first free ``path-2``, ``path-3`` ...;
    ``lock=False`` (a torchrun rank other than 0): claim nothing, write nothing.
    """
    if resume and overwrite:
        raise FedfmError("--resume and --overwrite exclude each other")
    path = Path(path)
    if not lock:
        return RunFolder(path, None, [], set())
    with io_errors():
        path, created = _reserve(path) if unique else _make(path)
        try:
            fd = _lock(path)
        except BaseException:
            _remove_empty(created)  # only if still empty: another run may have locked it meanwhile
            raise
        folder = RunFolder(path, fd, created, set(os.listdir(path)) - {LOCK_FILE})
        try:
            _take_over(folder, resume, overwrite)
        except BaseException:
            folder.abandon()
            folder.release()
            raise
    return folder


def _take_over(folder: RunFolder, resume: bool, overwrite: bool) -> None:
    """Check (or clear) what the locked folder holds; a new run gets its run id."""
    if resume:
        return
    if folder._before and not overwrite:
        raise FedfmError(f"out={folder.path} already holds files (another run?); resume it with --resume "
                         f"{folder.path}, clear it with --overwrite, or pick another out=")
    for name in folder._before:
        _remove(folder.path / name)
    folder._before = set()
    record = {"run_id": uuid.uuid4().hex, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    (folder.path / RUN_FILE).write_text(json.dumps(record) + "\n")


def _make(path: Path) -> tuple[Path, list[Path]]:
    """Create ``path`` (and parents) if needed: ``(path, the folders this process created, innermost first)``."""
    if path.exists() and not path.is_dir():
        raise FedfmError(f"out={path} is a file, not a run folder")
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    created = []
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:  # another process made it meanwhile: not ours to remove
            continue
        created.insert(0, d)
    return path, created


def _reserve(path: Path) -> tuple[Path, list[Path]]:
    """The first of ``path``, ``path-2``, ``path-3`` ... that this process creates (``mkdir`` is atomic)."""
    _, parents = _make(path.parent)
    for i in range(1, 10_000):
        candidate = path if i == 1 else path.with_name(f"{path.name}-{i}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate, [candidate, *parents]
    raise FedfmError(f"no free run folder name next to {path}")


def _lock(path: Path) -> int:
    """Lock ``path/.lock`` (non-blocking) and write our pid in it; the descriptor."""
    lock_path = path / LOCK_FILE
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise FedfmError(f"{path} is in use by another run (pid {owner})") from None
        except BaseException:
            os.close(fd)
            raise
        if _same_file(fd, lock_path):  # not removed by the previous owner between open and flock
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _remove_empty(folders: list[Path]) -> None:
    """``rmdir`` each folder (innermost first) that is still empty."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def io_errors():
    """Turn an OS error (read-only folder, full disk ...) into a one-line FedfmError naming the path."""
    try:
        yield
    except OSError as err:
        raise FedfmError(describe_os_error(err)) from None


def describe_os_error(err: OSError, path=None) -> str:
    """``I/O error on PATH: CAUSE`` in one line (``path`` when the error names none)."""
    where = err.filename if err.filename is not None else path
    cause = err.strerror or str(err) or type(err).__name__
    return f"I/O error on {where}: {cause}" if where is not None else f"I/O error: {cause}"
