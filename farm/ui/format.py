"""How the templates write times, durations and ids (Jinja filters)."""

from __future__ import annotations

from datetime import UTC, datetime

SHORT_ID = 12  # hex digits: unambiguous in any farm a person browses, and `farm` takes prefixes


def seconds(value: float | None) -> str:
    """``0.42 s``, ``12 s``, ``3 min 05 s``, ``1 h 02 min``; empty for None."""
    if value is None:
        return ""
    if value < 10:
        return f"{value:.2f} s"
    whole = round(value)
    if whole < 60:
        return f"{whole} s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def when(value: datetime | None) -> str:
    """UTC, to the second (the records' own clock)."""
    return f"{value.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC" if value else ""


def short(job_id: str) -> str:
    return job_id[:SHORT_ID]


def percent(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "0%"


FILTERS = {"seconds": seconds, "when": when, "short": short, "percent": percent}
