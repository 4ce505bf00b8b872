"""Client-side data quality: the filters a client runs on its own rows before it trains.

Real client data is messy (duplicated messages, empty rows, missing labels,
spam, label noise). Every function here is pure: it takes a client's texts,
labels or per-row losses and returns which rows to keep plus counts, so a
client filters its own rows and reports only counts (``kept``, dropped by
reason); no raw row leaves it. The ``data.quality`` config section
(:class:`fedfm.config.schema.QualityConfig`, off by default) turns them on.

Static filters (:func:`clean_rows`, once, when the client's shard is built),
one reason per dropped row, checked in this order:

* ``empty``: no letter or digit left after normalization (:func:`normalize`:
  Unicode NFKC, case folding, whitespace collapsed): blank rows, punctuation
  only, zero-width characters;
* ``short`` / ``long``: fewer than ``min_chars`` characters or ``min_words``
  words, more than ``max_chars`` / ``max_words`` (words: whitespace-separated
  tokens of the normalized text, independent of the model's tokenizer);
* ``label``: a classification row whose label is missing (an id outside
  ``[0, num_labels)`` or a name such as ``""``, ``nan``, ``none``, ``null``,
  ``n/a``: what a blank cell of a numeric CSV column becomes) or outside the
  run's label set (``data.quality.allowed_labels``, when given);
* ``duplicate``: the normalized text's SHA-1 equals an earlier kept row's;
* ``near_duplicate``: the word-shingle Jaccard similarity with an earlier
  kept row is at least ``near_dup_threshold``. Candidates come from MinHash
  signatures (Broder 1997, "On the resemblance and containment of documents")
  with locality-sensitive banding, and every candidate pair is verified with
  the exact Jaccard of its shingle sets, so the threshold is exact and MinHash
  only keeps the search sub-quadratic (as in the near-duplicate removal of
  Lee et al. 2022, "Deduplicating Training Data Makes Language Models Better").
  The first row of a cluster is kept.

Dynamic filter (:func:`loss_outliers`, ``data.quality.loss_filter``): each
time a client trains, from the global version ``loss_start_version`` on, it
scores its statically kept rows under the broadcast global model and leaves
out, for that participation, the rows whose loss lies above
``median + loss_k * MAD`` (the median absolute deviation: a robust outlier
rule, Hampel 1974; Leys et al. 2013) or above ``loss_max`` when set (the MAD
rule breaks down when half a client's rows are bad). Rows with noisy labels are the ones the
global model finds surprising (the small-loss criterion of learning with noisy
labels, e.g. Han et al. 2018, "Co-teaching"). It is done at every
participation, not once: the global model improves, and nothing about the
filter has to persist in the client's state.

What a client reports (:func:`quality_metrics`, in its update's metrics):
``dq_rows`` (its training rows before any filter), ``dq_kept`` (the rows it
trained on) and ``dq_<reason>`` for every reason. The server checks them
(:func:`report_problem`) and keeps the latest report of each client
(:func:`report_from_metrics`); ``kept / rows`` is the score of the ``quality``
aggregation weighting (:func:`kept_fraction`). Quality-aware aggregation of
clients by a data-quality score computed on the clients follows FedDQC
(Du et al. 2024, "Data Quality Control in Federated Instruction-tuning of
Large Language Models", arXiv:2410.11540).
"""

from __future__ import annotations

import hashlib
import math
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

# Every reason a row can be dropped for, in the order the filters check them (the loss filter last).
STATIC_REASONS = ("empty", "short", "long", "label", "duplicate", "near_duplicate")
REASONS = STATIC_REASONS + ("loss",)
ROWS, KEPT, PREFIX = "dq_rows", "dq_kept", "dq_"  # the update metrics a client reports

MISSING_LABEL_NAMES = frozenset({"", "nan", "none", "null", "n/a", "na", "?"})
_PRIME = (1 << 32) - 5  # the largest prime below 2^32: the hash family a*x + b mod p is exact in uint64
_SPACE = re.compile(r"\s+")


@dataclass
class QualityReport:
    """One client's counts: its rows before filtering, the rows kept, and the rows dropped per reason."""

    rows: int
    kept: int
    dropped: dict[str, int] = field(default_factory=lambda: {r: 0 for r in REASONS})

    def to_dict(self) -> dict:
        return {"rows": self.rows, "kept": self.kept, "dropped": {r: int(self.dropped.get(r, 0)) for r in REASONS}}


# -- text normalization, hashing, shingles ----------------------------------------------------------
def normalize(text: str) -> str:
    """Unicode NFKC, case-folded, whitespace collapsed to single spaces, stripped."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text or "").casefold()).strip()


def text_hash(normalized: str) -> str:
    """SHA-1 hex digest of a normalized text (the exact-duplicate key)."""
    return hashlib.sha1(normalized.encode("utf-8")).hexdigest()


def shingles(normalized: str, size: int) -> frozenset[str]:
    """The set of ``size``-word shingles of a normalized text (the whole text when it has fewer words)."""
    words = normalized.split(" ") if normalized else []
    if len(words) <= size:
        return frozenset([" ".join(words)]) if words else frozenset()
    return frozenset(" ".join(words[i : i + size]) for i in range(len(words) - size + 1))


def jaccard(a: frozenset, b: frozenset) -> float:
    """``|a ∩ b| / |a ∪ b|`` (1.0 for two empty sets)."""
    union = len(a | b)
    return 1.0 if union == 0 else len(a & b) / union


class MinHasher:
    """MinHash signatures of shingle sets: ``num_perm`` universal hashes ``(a x + b) mod p``, ``p = 2^32 - 5``.

    Shingles are first hashed to 32 bits (BLAKE2b) and reduced mod ``p``; with
    ``a, b < p`` every ``a x + b < p (p + 1) < 2^64``, so the family is exact in
    numpy ``uint64`` (no silent wrap-around). The probability that two
    signatures agree in one position estimates the Jaccard similarity of the
    sets (Broder 1997).
    """

    def __init__(self, num_perm: int = 128, seed: int = 0) -> None:
        rng = np.random.default_rng([seed, 0xD0D0])
        self.num_perm = num_perm
        self.a = rng.integers(1, _PRIME, size=num_perm, dtype=np.uint64)
        self.b = rng.integers(0, _PRIME, size=num_perm, dtype=np.uint64)

    def signature(self, items: frozenset[str]) -> np.ndarray:
        if not items:
            return np.full(self.num_perm, _PRIME, dtype=np.uint64)
        hv = np.array([int.from_bytes(hashlib.blake2b(s.encode("utf-8"), digest_size=4).digest(), "little") % _PRIME
                       for s in items], dtype=np.uint64)
        return ((self.a[:, None] * hv[None, :] + self.b[:, None]) % np.uint64(_PRIME)).min(axis=1)


def lsh_bands(num_perm: int, threshold: float, recall: float = 0.99) -> tuple[int, int]:
    """``(bands, rows per band)``: the most rows per band whose chance of making a pair at ``threshold``
    Jaccard a candidate, ``1 - (1 - t^r)^b`` with ``b = num_perm // r``, is still at least ``recall``."""
    best = (num_perm, 1)
    for r in range(1, num_perm + 1):
        b = num_perm // r
        if 1 - (1 - threshold**r) ** b >= recall:
            best = (b, r)
    return best


def near_duplicates(sets: Sequence[frozenset], threshold: float, num_perm: int = 128, seed: int = 0) -> np.ndarray:
    """Boolean mask: the rows whose Jaccard similarity with an earlier kept row is at least ``threshold``.

    MinHash + banding proposes candidate pairs; each is verified exactly (module doc).
    Rows are visited in order and a row is compared with the kept rows before it only.
    """
    n = len(sets)
    drop = np.zeros(n, dtype=bool)
    if n < 2:
        return drop
    hasher = MinHasher(num_perm, seed)
    bands, r = lsh_bands(num_perm, threshold)
    buckets: list[dict[bytes, list[int]]] = [dict() for _ in range(bands)]
    for i, s in enumerate(sets):
        sig = hasher.signature(s)
        keys = [sig[k * r : (k + 1) * r].tobytes() for k in range(bands)]
        candidates = {j for k, key in enumerate(keys) for j in buckets[k].get(key, ())}
        if any(jaccard(s, sets[j]) >= threshold for j in sorted(candidates)):
            drop[i] = True
            continue
        for k, key in enumerate(keys):  # only kept rows enter the index
            buckets[k].setdefault(key, []).append(i)
    return drop


# -- the static filters -----------------------------------------------------------------------------
def label_missing_or_invalid(labels: Sequence[int], label_names: Sequence[str] | None,
                             allowed: Sequence[str] | None = None) -> np.ndarray:
    """Boolean mask of rows whose label is missing or not in the run's label set (module doc)."""
    ids = np.asarray(labels, dtype=np.int64)
    n_names = len(label_names) if label_names is not None else None
    bad = ids < 0
    if n_names is not None:
        bad |= ids >= n_names
        names = [str(x).strip().casefold() for x in label_names]
        missing = np.array([nm in MISSING_LABEL_NAMES for nm in names], dtype=bool)
        if allowed is not None:
            ok = {str(a).strip().casefold() for a in allowed}
            missing |= np.array([nm not in ok for nm in names], dtype=bool)
        inside = ~bad
        bad[inside] = missing[ids[inside]]
    return bad


def clean_rows(texts: Sequence[str], labels: Sequence[int] | None, opts, label_names: Sequence[str] | None = None,
               seed: int = 0) -> tuple[np.ndarray, QualityReport]:
    """The static filters over one client's rows: ``(positions of the kept rows, counts)``.

    ``opts`` is a ``data.quality`` section (:class:`fedfm.config.schema.QualityConfig`);
    ``labels`` (ids) and ``label_names`` are None for unlabelled data (the label
    check is then skipped). Positions index ``texts`` and are returned in order.
    """
    n = len(texts)
    reason = np.full(n, -1, dtype=np.int64)  # index into STATIC_REASONS, -1: kept
    norm = [normalize(t) for t in texts]

    def mark(mask: np.ndarray, name: str) -> None:
        reason[(reason < 0) & mask] = STATIC_REASONS.index(name)

    chars = np.array([len(t) for t in norm], dtype=np.int64)
    words = np.array([len(t.split(" ")) if t else 0 for t in norm], dtype=np.int64)
    mark(np.array([not any(ch.isalnum() for ch in t) for t in norm], dtype=bool), "empty")
    mark((chars < opts.min_chars) | (words < opts.min_words), "short")
    too_long = np.zeros(n, dtype=bool)
    if opts.max_chars is not None:
        too_long |= chars > opts.max_chars
    if opts.max_words is not None:
        too_long |= words > opts.max_words
    mark(too_long, "long")
    if opts.labels and labels is not None:
        mark(label_missing_or_invalid(labels, label_names, opts.allowed_labels), "label")
    if opts.dedup:
        seen: set[str] = set()
        dup = np.zeros(n, dtype=bool)
        for i in np.flatnonzero(reason < 0):
            h = text_hash(norm[i])
            dup[i] = h in seen
            seen.add(h)
        mark(dup, "duplicate")
    if opts.near_dup:
        alive = np.flatnonzero(reason < 0)
        near = near_duplicates([shingles(norm[i], opts.shingle_size) for i in alive], opts.near_dup_threshold,
                               opts.num_perm, seed)
        mask = np.zeros(n, dtype=bool)
        mask[alive[near]] = True
        mark(mask, "near_duplicate")
    kept = np.flatnonzero(reason < 0)
    dropped = {r: int((reason == i).sum()) for i, r in enumerate(STATIC_REASONS)}
    dropped["loss"] = 0
    return kept, QualityReport(rows=n, kept=len(kept), dropped=dropped)


# -- the loss-outlier filter ------------------------------------------------------------------------
def loss_outliers(losses: Sequence[float], k: float | None, max_loss: float | None = None) -> np.ndarray:
    """Boolean mask of the rows whose loss is above ``median + k * MAD`` (MAD: median absolute deviation;
    ``k=None`` turns this rule off), or above ``max_loss`` when given.

    Non-finite losses are outliers. When the MAD is 0 (at least half the rows
    share one loss), the MAD rule marks nothing: there is no spread to measure.
    Like every median-based rule it breaks down when half a client's rows are
    bad; ``max_loss`` (e.g. ``ln C``, the loss of a uniform guess over C
    classes: the model gives the row's label less than chance) still holds then.
    """
    x = np.asarray(losses, dtype=np.float64)
    out = ~np.isfinite(x)
    finite = x[~out]
    if len(finite) == 0:
        return out
    if max_loss is not None:
        out |= np.isfinite(x) & (x > max_loss)
    if k is None:
        return out
    med = float(np.median(finite))
    mad = float(np.median(np.abs(finite - med)))
    if mad > 0:
        out |= np.isfinite(x) & (x > med + k * mad)
    return out


def with_loss_drops(report: QualityReport, dropped: int) -> QualityReport:
    """``report`` after the loss filter left out ``dropped`` more rows this participation."""
    counts = dict(report.dropped)
    counts["loss"] = int(dropped)
    return QualityReport(rows=report.rows, kept=report.kept - int(dropped), dropped=counts)


# -- what travels: the counts in an update's metrics, checked by the server ---------------------------
def quality_metrics(report: QualityReport) -> dict[str, float]:
    """The counts a client adds to its update's metrics (``dq_rows``, ``dq_kept``, ``dq_<reason>``)."""
    out = {ROWS: float(report.rows), KEPT: float(report.kept)}
    out.update((PREFIX + r, float(report.dropped.get(r, 0))) for r in REASONS)
    return out


def report_problem(metrics: Mapping[str, float], num_examples: int) -> str | None:
    """Why an update's data-quality counts are implausible, or None (also None when it carries none).

    The counts must be non-negative integers, ``kept <= rows``, the drops must
    add up to ``rows - kept``, and the update's ``num_examples`` must equal ``kept``.
    """
    if ROWS not in metrics and KEPT not in metrics:
        return None
    values = {}
    for key in (ROWS, KEPT, *(PREFIX + r for r in REASONS)):
        v = metrics.get(key)
        if v is None:
            return f"data-quality report lacks {key}"
        v = float(v)
        if not math.isfinite(v) or v < 0 or not v.is_integer():
            return f"data-quality count {key}={v} is not a non-negative integer"
        values[key] = int(v)
    rows, kept = values[ROWS], values[KEPT]
    if kept > rows:
        return f"data-quality report keeps {kept} of {rows} rows"
    if sum(values[PREFIX + r] for r in REASONS) != rows - kept:
        return f"data-quality drops do not add up to {rows} - {kept} rows"
    if num_examples != kept:
        return f"data-quality report keeps {kept} rows, but the update claims {num_examples} examples"
    return None


def kept_fraction(metrics: Mapping[str, float], client_id: int) -> float:
    """``dq_kept / dq_rows`` in [0, 1]; ValueError when the update carries no valid report."""
    if ROWS not in metrics or KEPT not in metrics:
        raise ValueError(f"client {client_id}: quality weighting needs the update's data-quality counts "
                         "(data.quality.enabled on the client)")
    rows, kept = float(metrics[ROWS]), float(metrics[KEPT])
    if not (math.isfinite(rows) and math.isfinite(kept)) or rows <= 0 or not 0 <= kept <= rows:
        raise ValueError(f"client {client_id}: data-quality fraction {kept}/{rows} is not in [0, 1]")
    return kept / rows


def report_from_metrics(metrics: Mapping[str, float]) -> dict:
    """A checked report as the JSON row the server keeps (``rows``, ``kept``, ``dropped`` by reason)."""
    return QualityReport(int(metrics[ROWS]), int(metrics[KEPT]),
                         {r: int(metrics[PREFIX + r]) for r in REASONS}).to_dict()


# -- tables and the one-line summary ----------------------------------------------------------------
def quality_table(reports: Mapping[int, dict]) -> dict:
    """Totals and the per-client rows of ``reports`` (client id -> :meth:`QualityReport.to_dict`)."""
    clients = [{"client": int(c), **reports[c]} for c in sorted(reports, key=int)]
    dropped = {r: sum(int(x["dropped"].get(r, 0)) for x in clients) for r in REASONS}
    return {"rows": sum(x["rows"] for x in clients), "kept": sum(x["kept"] for x in clients),
            "dropped": dropped, "clients": clients}


def summary_line(table: Mapping) -> str:
    """``data quality: 1234 rows kept, 56 dropped (duplicate 40, empty 10, label 6)``."""
    parts = [f"{r} {n}" for r, n in sorted(table["dropped"].items(), key=lambda x: (-x[1], REASONS.index(x[0])))
             if n]
    total = sum(table["dropped"].values())
    return (f"data quality: {table['kept']} rows kept, {total} dropped"
            + (f" ({', '.join(parts)})" if parts else ""))
