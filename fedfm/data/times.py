"""A time column as numbers: what ``continual.time_column`` orders and cuts a stream by.

Each value is either a number (a Unix time, a day index, a year) or a date /
date-time (ISO 8601 text such as ``2024-03-01`` or ``2024-03-01T12:00:00Z``, or
a timestamp column of a Parquet file / saved dataset). Dates become seconds
since 1970-01-01 UTC (naive ones are read as UTC), so boundaries can be given
in the same form as the values. A column that mixes the two kinds, or holds
anything else (an empty cell, a word), is refused with one line.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any, Sequence

import numpy as np

from fedfm.errors import FedfmError


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _seconds(value: Any) -> float | None:
    """Seconds since the epoch (UTC) of a date / date-time value, or None when it is not one."""
    if isinstance(value, str):
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            value = dt.datetime.fromisoformat(text)
        except ValueError:
            return None
    if isinstance(value, np.datetime64):
        value = value.astype("datetime64[us]").item()
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return value.timestamp()
    if isinstance(value, dt.date):
        return dt.datetime(value.year, value.month, value.day, tzinfo=dt.timezone.utc).timestamp()
    return None


def parse_time(value: Any) -> tuple[float, str] | None:
    """``(value as a float, "number" | "date")``, or None when it is neither."""
    x = _number(value)
    if x is not None and math.isfinite(x):
        return x, "number"
    s = _seconds(value)
    return None if s is None else (s, "date")


def parse_times(values: Sequence[Any], column: str, where: str) -> np.ndarray:
    """Every value of the time column ``column`` (of ``where``, a file), all of one kind.

    Numbers come back as float64, dates as ``datetime64[us]`` (UTC): the dtype
    keeps the kind, so boundaries can be checked against it (:func:`as_seconds`).
    """
    out = np.empty(len(values), dtype=np.float64)
    kind = None
    for i, value in enumerate(values):
        parsed = parse_time(value)
        if parsed is None:
            raise FedfmError(
                f"time column '{column}' in {where}: row {i + 1} has {value!r}, "
                "which is neither a number nor a date (e.g. 2024-03-01 or 2024-03-01T12:00:00)"
            )
        if kind is not None and parsed[1] != kind:
            raise FedfmError(f"time column '{column}' in {where}: row {i + 1} is a {parsed[1]} but earlier rows are "
                             f"{kind}s; use one kind throughout")
        out[i], kind = parsed
    return (out * 1e6).round().astype("datetime64[us]") if kind == "date" else out


def is_date(times: np.ndarray) -> bool:
    return np.issubdtype(np.asarray(times).dtype, np.datetime64)


def as_seconds(times: np.ndarray) -> np.ndarray:
    """Times as float64: numbers as they are, dates as seconds since the epoch."""
    times = np.asarray(times)
    if is_date(times):
        return times.astype("datetime64[us]").astype(np.int64) / 1e6
    return times.astype(np.float64)


def format_time(x: float, date: bool) -> str:
    """A time for a stage name: ``2024-03-01`` (a midnight), ``2024-03-01T12:30:00``, or a number."""
    if not date:
        return f"{x:g}"
    t = dt.datetime.fromtimestamp(round(x), tz=dt.timezone.utc)
    return t.date().isoformat() if t.time() == dt.time(0) else t.replace(tzinfo=None).isoformat()
