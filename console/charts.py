"""Step-duration charts, drawn on the server as inline SVG: no JavaScript, no chart library.

A chart is a histogram of a step's recent durations for one saga type, with
the median and 95th percentile marked and, on the instance page, this
instance's own duration (or time so far, while it runs) as a red line: the
question it answers at a glance is "is this one unusually slow?".

Durations spread over orders of magnitude (a 40 ms step that sometimes
takes 30 s), so the axis turns logarithmic when the slowest is more than
20 times the fastest. Each chart has a ``<title>`` and a ``<desc>`` that
says in words what it shows, for screen readers; every text in it is
escaped. Colours come from classes in ``console.css`` (the CSP forbids
inline styles).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from flask import Blueprint, render_template, request
from flask.typing import ResponseReturnValue
from markupsafe import Markup

from console import services
from console.formatting import duration
from engine.errors import InvalidInput
from engine.model import Instance, StepState
from engine.states import StepStatus

WIDTH = 400
HEIGHT = 132
_LEFT, _RIGHT, _TOP, _BOTTOM = 8, 8, 20, 24
BINS = 24
#: The axis is logarithmic when the slowest duration is this many times the fastest.
LOG_SPREAD = 20
MAX_TICKS = 6
_SECOND, _MINUTE, _HOUR = 1000, 60_000, 3_600_000
#: Round durations a logarithmic axis puts its ticks on (ms).
_NICE_MS = (
    [1, 2, 5, 10, 20, 50, 100, 200, 500]
    + [s * _SECOND for s in (1, 2, 5, 10, 30)]
    + [m * _MINUTE for m in (1, 2, 5, 10, 30)]
    + [h * _HOUR for h in (1, 2, 6, 12, 24)]
)
_MAJOR_MS = {1, 10, 100, _SECOND, 10 * _SECOND, _MINUTE, 10 * _MINUTE, _HOUR, 24 * _HOUR}


@dataclass(frozen=True)
class Marker:
    """This instance's duration of the step, drawn as a line."""

    ms: int
    label: str  # "this saga: 4.2 s" or "this saga: 3m 05s so far"


@dataclass(frozen=True)
class Summary:
    """The numbers a chart shows, also said in words."""

    runs: int
    median: int
    p95: int
    slowest: int


def summarize(durations: Sequence[int]) -> Summary | None:
    if not durations:
        return None
    ordered = sorted(durations)
    return Summary(len(ordered), _quantile(ordered, 0.5), _quantile(ordered, 0.95), ordered[-1])


def histogram(
    durations: Sequence[int],
    *,
    chart_id: str,
    title: str,
    marker: Marker | None = None,
) -> Markup:
    """An accessible SVG histogram of ``durations`` (ms), or a note when there are none."""
    summary = summarize(durations)
    if summary is None:
        return Markup('<p class="muted chart-empty">{}</p>').format(
            "No finished runs of this step yet to compare with."
        )
    scale = _Scale(list(durations) + ([marker.ms] if marker else []))
    parts = [_bars(durations, scale), _axis(scale)]
    parts.append(_rule(scale, summary.median, "median", "chart-median", 0))
    parts.append(_rule(scale, summary.p95, "p95", "chart-p95", 1))
    if marker is not None:
        parts.append(_marker(scale, marker))
    desc = describe(title, summary, marker, durations)
    head = Markup(
        '<svg class="chart" viewBox="0 0 {w} {h}" role="img" '
        'aria-labelledby="{id}-title {id}-desc" xmlns="http://www.w3.org/2000/svg">'
        '<title id="{id}-title">{title}</title><desc id="{id}-desc">{desc}</desc>'
    ).format(w=WIDTH, h=HEIGHT, id=chart_id, title=title, desc=desc)
    return head + Markup("").join(parts) + Markup("</svg>")


def describe(title: str, summary: Summary, marker: Marker | None, durations: Sequence[int]) -> str:
    """The chart in one sentence: runs, median, 95th percentile, slowest, and this saga."""
    text = (
        f"{title}: {summary.runs} recent run{'s' if summary.runs != 1 else ''}, "
        f"median {duration(summary.median)}, 95th percentile {duration(summary.p95)}, "
        f"slowest {duration(summary.slowest)}."
    )
    if marker is not None:
        slower = sum(1 for d in durations if d < marker.ms) / len(durations)
        text += f" {marker.label.capitalize()}, slower than {slower:.0%} of them."
    return text


def step_marker(inst: Instance, step: StepState, now: int) -> Marker | None:
    """This instance's duration of ``step``: finished, or so far while it runs."""
    if step.started_at is None:
        return None
    if step.status is StepStatus.RUNNING:
        took = max(now - step.started_at, 0)
        return Marker(took, f"this saga: {duration(took)} so far")
    if step.finished_at is None:
        return None
    took = max(step.finished_at - step.started_at, 0)
    ending = "" if step.status is StepStatus.SUCCEEDED else f", {step.status.replace('_', ' ')}"
    return Marker(took, f"this saga: {duration(took)}{ending}")


def step_charts(inst: Instance, durations: Mapping[str, list[int]], now: int) -> dict[int, Markup]:
    """One chart per step of ``inst``, keyed by step index, each with this instance marked."""
    return {
        step.index: histogram(
            durations.get(step.name, []),
            chart_id=f"chart-{step.index}",
            title=f"Duration of step {step.name} ({inst.saga_name})",
            marker=step_marker(inst, step, now),
        )
        for step in inst.steps
    }


# -- drawing ---------------------------------------------------------------------


class _Scale:
    """Maps milliseconds to x; logarithmic when the values spread widely."""

    def __init__(self, values: Sequence[int]) -> None:
        lo, hi = max(min(values), 0), max(values)
        self.log = (lo > 0 and hi / lo > LOG_SPREAD) or (lo == 0 and hi > LOG_SPREAD)
        self.lo, self.hi = self._t(lo), self._t(hi)
        self.same: float | None = None
        if self.hi - self.lo < 1e-9:  # every run took the same time: centre it
            self.same = float(hi)
            self.lo, self.hi = self.lo - 0.5, self.hi + 0.5
        self.width = WIDTH - _LEFT - _RIGHT

    def _t(self, ms: float) -> float:
        return math.log10(max(ms, 1)) if self.log else float(ms)

    def x(self, ms: float) -> float:
        return _LEFT + (self._t(ms) - self.lo) / (self.hi - self.lo) * self.width

    def bin_of(self, ms: int) -> int:
        share = (self._t(ms) - self.lo) / (self.hi - self.lo)
        return min(int(share * BINS), BINS - 1)

    def bin_edges(self, index: int) -> tuple[float, float]:
        left = _LEFT + self.width * index / BINS
        return left, left + self.width / BINS

    def ticks(self) -> list[float]:
        if self.same is not None:
            return [self.same]
        if self.log:
            found = [float(v) for v in _NICE_MS if self.lo <= math.log10(v) <= self.hi]
            if len(found) > MAX_TICKS:  # too many: keep the decades (and the minute, hour)
                found = [v for v in found if v in _MAJOR_MS]
            every = math.ceil(len(found) / MAX_TICKS)
            return found[::every]
        step = _nice_step(self.hi - self.lo)
        first = math.ceil(self.lo / step) * step
        count = int((self.hi - first) / step) + 1
        return [first + i * step for i in range(count)]


def _bars(durations: Sequence[int], scale: _Scale) -> Markup:
    counts = [0] * BINS
    for ms in durations:
        counts[scale.bin_of(ms)] += 1
    tallest = max(counts)
    plot = HEIGHT - _TOP - _BOTTOM
    bars = []
    for index, count in enumerate(counts):
        if not count:
            continue
        left, right = scale.bin_edges(index)
        height = max(plot * count / tallest, 1.5)
        bars.append(
            Markup(
                '<rect class="chart-bar" x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" '
                'height="{h:.1f}"><title>{n} run{s}</title></rect>'
            ).format(
                x=left + 0.5,
                y=HEIGHT - _BOTTOM - height,
                w=max(right - left - 1, 1),
                h=height,
                n=count,
                s="s" if count != 1 else "",
            )
        )
    return Markup("").join(bars)


def _axis(scale: _Scale) -> Markup:
    base = HEIGHT - _BOTTOM
    parts = [
        Markup('<line class="chart-axis" x1="{a}" y1="{y}" x2="{b}" y2="{y}"/>').format(
            a=_LEFT, b=WIDTH - _RIGHT, y=base
        )
    ]
    for tick in scale.ticks():
        x = scale.x(tick)
        # Labels at the very edges align inwards instead of being cut off.
        anchor = "start" if x < _LEFT + 20 else ("end" if x > WIDTH - _RIGHT - 20 else "middle")
        parts.append(
            Markup(
                '<line class="chart-tick" x1="{x:.1f}" y1="{y}" x2="{x:.1f}" y2="{y2}"/>'
                '<text class="chart-label" x="{x:.1f}" y="{ty}" text-anchor="{a}">{t}</text>'
            ).format(x=x, y=base, y2=base + 4, ty=base + 16, a=anchor, t=tick_label(tick))
        )
    return Markup("").join(parts)


def _rule(scale: _Scale, ms: int, label: str, css: str, row: int) -> Markup:
    x = scale.x(ms)
    anchor = "end" if x > WIDTH * 0.8 else "start"
    dx = -3 if anchor == "end" else 3
    return Markup(
        '<line class="{c}" x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{base}"/>'
        '<text class="chart-note {c}-text" x="{tx:.1f}" y="{ty}" text-anchor="{a}">{t}</text>'
    ).format(
        c=css,
        x=x,
        top=_TOP + 4,
        base=HEIGHT - _BOTTOM,
        tx=x + dx,
        ty=_TOP + 12 + row * 13,
        a=anchor,
        t=f"{label} {duration(ms)}",
    )


def _marker(scale: _Scale, marker: Marker) -> Markup:
    x = scale.x(marker.ms)
    anchor = "end" if x > WIDTH * 0.6 else "start"
    dx = -4 if anchor == "end" else 4
    return Markup(
        '<line class="chart-marker" x1="{x:.1f}" y1="4" x2="{x:.1f}" y2="{base}"/>'
        '<text class="chart-marker-text" x="{tx:.1f}" y="13" text-anchor="{a}">{t}</text>'
    ).format(x=x, base=HEIGHT - _BOTTOM, tx=x + dx, a=anchor, t=marker.label)


def tick_label(ms: float) -> str:
    """A short axis label: ``50 ms``, ``2 s``, ``1.5 s``, ``10 min``, ``2 h``, ``1 d``."""
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("min", 60_000), ("s", 1000)):
        if ms >= size:
            return f"{ms / size:.3g} {unit}"
    return f"{ms:.3g} ms"


def _quantile(ordered: Sequence[int], q: float) -> int:
    index = min(math.ceil(q * len(ordered)) - 1, len(ordered) - 1)
    return ordered[max(index, 0)]


def _nice_step(span: float) -> float:
    """A round step (1, 2 or 5 times a power of ten) giving at most MAX_TICKS ticks."""
    if span <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(span))
    for step in (power / 10, power / 5, power / 2, power, power * 2):
        if span / step <= MAX_TICKS:
            return step
    return power * 5


# -- the overview page -----------------------------------------------------------

bp = Blueprint("charts", __name__)

#: Recent instances per saga type whose step durations the overview shows.
OVERVIEW_RUNS = 300


@dataclass(frozen=True)
class StepChart:
    """One step's chart on the overview page."""

    step: str
    chart: Markup
    summary: Summary | None


@bp.get("/durations")
def overview() -> ResponseReturnValue:
    """Per saga type, how long each step took over its recent instances."""
    svc = services.get()
    names = svc.engine.registry.names()
    wanted = request.args.get("saga", "").strip()
    if wanted and wanted not in names:
        known = ", ".join(names) or "none (set SAGA_APP)"
        raise InvalidInput("saga", f"{wanted!r} is not a saga type this console loads: {known}")
    shown = [wanted] if wanted else names
    sagas = {name: _saga_charts(name) for name in shown}
    return render_template("durations.html", sagas=sagas, names=names, wanted=wanted)


def _saga_charts(name: str) -> list[StepChart]:
    durations = services.get().queries.recent_step_durations(name, OVERVIEW_RUNS)
    steps = [s.name for s in services.get().engine.registry.latest(name).steps]
    steps += [s for s in durations if s not in steps]  # steps of older versions
    return [
        StepChart(
            step,
            histogram(
                durations.get(step, []),
                chart_id=f"chart-{name}-{index}",
                title=f"Duration of step {step} ({name})",
            ),
            summarize(durations.get(step, [])),
        )
        for index, step in enumerate(steps)
    ]
