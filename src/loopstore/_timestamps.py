"""chrono's RFC 3339 timestamps (``DateTime<Utc>``, nanosecond precision) as text.

Standard library only: the models and the on-disk format share these, and a listing
imports the format without the models.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

__all__ = ["format_timestamp", "parse_timestamp", "timestamp_nanos"]

_TS_RE = re.compile(
    r"^(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?(Z|z|[+-]\d\d:?\d\d)$"
)


def format_timestamp(dt: datetime, *, nanos: int | None = None) -> str:
    """Write ``dt`` as chrono's RFC 3339 form (``SecondsFormat::AutoSi``, ``Z`` suffix).

    The fraction has 0, 3, 6 or 9 digits, the fewest that hold the value. ``nanos``
    (0..999_999_999) overrides the sub-second part, since datetime holds only micros.
    Naive datetimes are taken as UTC.
    """
    dt = dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt.astimezone(timezone.utc)
    ns = dt.microsecond * 1000 if nanos is None else nanos
    if not 0 <= ns <= 999_999_999:
        raise ValueError(f"nanos out of range: {ns}")
    base = dt.strftime("%Y-%m-%dT%H:%M:%S")
    if ns == 0:
        frac = ""
    elif ns % 1_000_000 == 0:
        frac = f".{ns // 1_000_000:03d}"
    elif ns % 1000 == 0:
        frac = f".{ns // 1000:06d}"
    else:
        frac = f".{ns:09d}"
    return f"{base}{frac}Z"


def parse_timestamp(text: str) -> datetime:
    """Parse RFC 3339 text into an aware UTC datetime (nanoseconds truncated to micros)."""
    m = _TS_RE.match(text)
    if m is None:
        raise ValueError(f"not an RFC 3339 timestamp: {text!r}")
    year, month, day, hour, minute, second, frac, tz = m.groups()
    micro = int((frac or "0").ljust(9, "0")[:6])
    if tz in ("Z", "z"):
        tzinfo = timezone.utc
    else:
        sign = -1 if tz[0] == "-" else 1
        digits = tz[1:].replace(":", "")
        tzinfo = timezone(sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:])))
    dt = datetime(
        int(year), int(month), int(day), int(hour), int(minute), int(second), micro, tzinfo
    )
    return dt.astimezone(timezone.utc)


def timestamp_nanos(text: str) -> int:
    """Nanoseconds since the Unix epoch for RFC 3339 text, exact to the nanosecond."""
    m = _TS_RE.match(text)
    if m is None:
        raise ValueError(f"not an RFC 3339 timestamp: {text!r}")
    whole = parse_timestamp(text).replace(microsecond=0)
    frac = int((m.group(7) or "0").ljust(9, "0"))
    epoch = datetime(1970, 1, 1, tzinfo=timezone.utc)
    return (whole - epoch) // timedelta(seconds=1) * 1_000_000_000 + frac
