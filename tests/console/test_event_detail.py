"""Event details read as times and spans, not epoch numbers, and stay escaped."""

from __future__ import annotations

from console.formatting import event_detail


def test_times_and_spans_are_shown_for_people() -> None:
    text = event_detail({"deadline_at": 1_795_635_770_719, "duration_ms": 12, "why": "late"})
    assert text == "deadline at: 2026-11-25 19:42:50.719 · duration: 12 ms · why: late"


def test_a_stuck_finding_shows_since_when() -> None:
    detail = {"no_progress_since": 1_795_635_770_719}
    assert event_detail(detail) == "no progress since: 2026-11-25 19:42:50.719"


def test_other_values_show_as_json_and_nothing_shows_for_none() -> None:
    assert event_detail({"version": 1, "flags": [1, 2]}) == "version: 1 · flags: [1, 2]"
    assert event_detail(None) == ""
