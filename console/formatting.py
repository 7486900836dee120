"""Jinja filters that turn the engine's epoch milliseconds and JSON into text for people.

Every time is shown in UTC; relative times ("3m 05s ago") are computed when
the page renders.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from flask import Flask, url_for

from console.services import Role
from engine.model import now_ms


def init_app(app: Flask) -> None:
    app.add_template_filter(timestamp, "ts")
    app.add_template_filter(since, "since")
    app.add_template_filter(duration, "duration")
    app.add_template_filter(pretty_json, "pretty_json")
    app.add_template_filter(tally, "tally")
    app.add_template_filter(event_detail, "event_detail")
    app.add_template_global(now_ms, "now_ms")
    app.add_template_global(Role, "Role")
    app.add_template_global(link, "link")


def timestamp(ms: int | None) -> str:
    """``2026-11-25 19:07:21.123`` (UTC), or an em dash for no time."""
    if ms is None:
        return "—"
    at = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return at.strftime("%Y-%m-%d %H:%M:%S.") + f"{ms % 1000:03d}"


def since(ms: int | None) -> str:
    """How long ago ``ms`` was, e.g. ``3m 05s``."""
    if ms is None:
        return "—"
    return duration(max(now_ms() - ms, 0))


def duration(ms: int | None) -> str:
    """A span of milliseconds, short: ``850 ms``, ``4.2 s``, ``3m 05s``, ``2h 03m``, ``4d 02h``."""
    if ms is None:
        return "—"
    if ms < 1000:
        return f"{ms} ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours:02d}h"


def tally(count: int, cap: int) -> str:
    """A count as the tabs show it: ``1,234``, or ``10,000+`` past the cap."""
    return f"{cap:,}+" if count > cap else f"{count:,}"


def pretty_json(value: Any) -> str:
    """Indented JSON text; the template escapes it like any other text."""
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)


def event_detail(detail: dict[str, Any] | None) -> str:
    """An event's detail for people: ``deadline at: 2026-11-25 19:42:50.719 · duration: 12 ms``.

    Keys ending in ``_at`` or ``_since`` are epoch milliseconds and ``_ms``
    are spans; the rest show as JSON. The template escapes the result like any other text.
    """
    parts = []
    for key, value in (detail or {}).items():
        label = key.replace("_", " ")
        if key.endswith(("_at", "_since")) and isinstance(value, int):
            text = timestamp(value)
        elif key.endswith("_ms") and isinstance(value, int):
            label, text = label[:-3], duration(value)
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
        parts.append(f"{label}: {text}")
    return " · ".join(parts)


def link(endpoint: str, args: dict[str, str], **changes: Any) -> str:
    """``url_for(endpoint)`` with the query ``args`` kept, ``changes`` applied, None dropped."""
    merged: dict[str, Any] = {**args, **changes}
    return url_for(endpoint, **{k: v for k, v in merged.items() if v not in (None, "")})
