"""Step-duration charts: server-rendered SVG that says in words what it shows.

The drawing is checked as SVG (title, desc, escaped text, the marker where
this instance's duration falls); the pages are checked through the test
client: a chart per step on the instance page, and the overview per saga
type, with a 400 for a saga type the console does not know.
"""

from __future__ import annotations

import re
from dataclasses import replace
from xml.etree import ElementTree

from flask.testing import FlaskClient

from console.charts import (
    Marker,
    _Scale,
    histogram,
    step_marker,
    summarize,
    tick_label,
)
from engine import SagaEngine, StepStatus
from engine.model import Instance, StepState
from engine.states import SagaState
from tests.console.support import dead_lettered, text

SVG = "{http://www.w3.org/2000/svg}"


def parse(markup: str) -> ElementTree.Element:
    return ElementTree.fromstring(markup)


def test_a_histogram_is_an_accessible_svg_with_median_p95_and_the_marker() -> None:
    durations = [100, 110, 120, 130, 140, 150, 160, 170, 180, 1000]
    svg = parse(
        histogram(
            durations, chart_id="c-1", title="Duration of step ship", marker=Marker(900, "this")
        )
    )

    assert svg.get("role") == "img"
    assert svg.get("aria-labelledby") == "c-1-title c-1-desc"
    assert svg.findtext(f"{SVG}title") == "Duration of step ship"
    desc = svg.findtext(f"{SVG}desc") or ""
    assert "10 recent runs, median 140 ms, 95th percentile 1.0 s, slowest 1.0 s" in desc
    assert "slower than 90% of them" in desc
    bars = svg.findall(f"{SVG}rect")
    assert sum(int((b.findtext(f"{SVG}title") or "0").split()[0]) for b in bars) == 10
    lines = {line.get("class") for line in svg.findall(f"{SVG}line")}
    assert {"chart-median", "chart-p95", "chart-marker", "chart-axis"} <= lines


def test_every_text_in_the_chart_is_escaped() -> None:
    nasty = "<script>alert(1)</script>"
    markup = histogram([5, 6], chart_id="x", title=f"step {nasty}", marker=Marker(5, nasty))
    assert nasty not in markup
    assert "&lt;script&gt;" in markup
    parse(markup)  # still well-formed


def test_no_durations_is_a_note_not_an_empty_chart() -> None:
    markup = histogram([], chart_id="x", title="t")
    assert "<svg" not in markup and "No finished runs" in markup


def test_a_wide_spread_gets_a_logarithmic_axis_with_round_ticks() -> None:
    scale = _Scale([40, 90_000])
    assert scale.log
    assert [tick_label(v) for v in scale.ticks()] == ["100 ms", "1 s", "10 s", "1 min"]
    assert [tick_label(v) for v in _Scale([900, 70_000]).ticks()] == [
        "1 s",
        "2 s",
        "5 s",
        "10 s",
        "30 s",
        "1 min",
    ]
    assert not _Scale([40, 120]).log
    assert [tick_label(v) for v in _Scale([40, 120]).ticks()] == [
        "40 ms",
        "60 ms",
        "80 ms",
        "100 ms",
        "120 ms",
    ]
    assert _Scale([7, 7]).ticks() == [7.0]


def test_summary_quantiles() -> None:
    summary = summarize(list(range(1, 101)))
    assert summary is not None
    assert (summary.runs, summary.median, summary.p95, summary.slowest) == (100, 50, 95, 100)
    assert summarize([]) is None


def test_the_marker_is_the_finished_duration_or_the_time_so_far() -> None:
    step = StepState(0, "ship", status=StepStatus.SUCCEEDED, started_at=1000, finished_at=3500)
    inst = Instance("i", "order", 1, SagaState.RUNNING, 0, (step,), {}, "c")
    assert step_marker(inst, step, now=9999) == Marker(2500, "this saga: 2.5 s")
    running = replace(step, status=StepStatus.RUNNING, finished_at=None)
    assert step_marker(inst, running, now=61_000) == Marker(60_000, "this saga: 1m 00s so far")
    timed_out = replace(step, status=StepStatus.TIMED_OUT)
    assert step_marker(inst, timed_out, now=0) == Marker(2500, "this saga: 2.5 s, timed out")
    assert step_marker(inst, StepState(0, "ship"), now=0) is None


def test_the_instance_page_has_a_chart_per_step_with_this_saga_marked(
    viewer: FlaskClient, saga_engine: SagaEngine
) -> None:
    for n in range(5):
        saga_engine.run("order", {}, business_key=f"ORD-{n}")
    inst = dead_lettered(saga_engine)

    html = text(viewer.get(f"/sagas/{inst.id}"))

    charts = re.findall(r'<svg class="chart".*?</svg>', html, re.S)
    assert len(charts) == 3  # reserve, charge, ship
    titles = [parse(c).findtext(f"{SVG}title") for c in charts]
    assert titles == [f"Duration of step {s} (order)" for s in ("reserve", "charge", "ship")]
    assert all("this saga" in c for c in charts)
    assert "failed" in charts[2]  # ship failed: its marker says so


def test_the_overview_shows_each_saga_type_and_refuses_an_unknown_one(
    viewer: FlaskClient, saga_engine: SagaEngine
) -> None:
    for n in range(3):
        saga_engine.run("order", {}, business_key=f"ORD-{n}")

    page = text(viewer.get("/durations"))
    only_order = text(viewer.get("/durations?saga=order"))
    unknown = viewer.get("/durations?saga=<b>nope</b>")

    assert 'id="durations-order"' in page and 'id="durations-hostile"' in page
    assert "3 runs · median" in only_order and 'id="durations-hostile"' not in only_order
    assert unknown.status_code == 400
    assert "<b>nope</b>" not in text(unknown)
