"""Run every benchmark variant side by side and print one combined JSON document.

Each variant is a script run as its own subprocess (own venv, own Python
process, one after another so they never compete for the 2 cores) that prints
the shared variant shape as its last stdout line.  Adding a variant is one line
in VARIANTS.  Stdlib only.

    python3 bench/baselines.py                 # floor + dbos, default plan
    python3 bench/baselines.py --only floor    # a subset
    python3 bench/baselines.py --seq-n 100 --conc-count 500 --conc-duration 5
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import add_plan_args, plan_dict, plan_from_args

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PROJECT_PY = REPO / ".venv" / "bin" / "python"
DBOS_PY = BENCH / ".venv-dbos" / "bin" / "python"
VARIANT_TIMEOUT_S = 600


@dataclass(frozen=True)
class Variant:
    """A benchmark script and the interpreter (venv) it runs under."""

    name: str
    python: Path
    script: str
    setup: tuple[str, ...] = ()  # command run first, e.g. to build the venv


VARIANTS: tuple[Variant, ...] = (
    Variant("floor", PROJECT_PY, "floor.py"),
    Variant("dbos", DBOS_PY, "dbos_baseline.py", setup=("bash", str(BENCH / "setup-dbos.sh"))),
    Variant("engine", PROJECT_PY, "engine_bench.py"),
)

# Every variant is compared against each of these (when present in the run).
REFERENCES = ("floor", "dbos")


def plan_argv(args: argparse.Namespace) -> list[str]:
    """Re-serialise the plan options so every variant runs the identical plan."""
    return [
        "--seq-n", str(args.seq_n),
        "--seq-warmup", str(args.seq_warmup),
        "--threads", ",".join(str(t) for t in args.threads),
        "--conc-count", str(args.conc_count),
        "--conc-duration", str(args.conc_duration),
        "--conc-warmup", str(args.conc_warmup),
    ]  # fmt: skip


def _failure(
    variant: Variant, why: str, proc: subprocess.CompletedProcess[str] | None
) -> dict[str, Any]:
    """Result entry for a variant that did not produce JSON (the run goes on)."""
    stderr = proc.stderr[-2000:] if proc is not None else ""
    rc = proc.returncode if proc is not None else None
    return {"variant": variant.name, "error": why, "returncode": rc, "stderr_tail": stderr}


def _last_json_line(stdout: str) -> dict[str, Any]:
    """A variant's result is its last non-empty stdout line (libraries may print before it)."""
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    if not lines:
        raise ValueError("variant printed nothing on stdout")
    doc = json.loads(lines[-1])
    if not isinstance(doc, dict):
        raise ValueError("variant's last line is not a JSON object")
    return doc


def run_variant(variant: Variant, argv: list[str]) -> dict[str, Any]:
    """Set up (if needed) and run one variant; returns its document or a failure entry."""
    print(f"[baselines] {variant.name}: starting", file=sys.stderr, flush=True)
    if variant.setup:
        setup = subprocess.run(variant.setup, capture_output=True, text=True, check=False)
        if setup.returncode != 0:
            return _failure(variant, "setup failed", setup)
    if not variant.python.exists():
        return _failure(variant, f"interpreter not found: {variant.python}", None)
    cmd = [str(variant.python), str(BENCH / variant.script), *argv]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=VARIANT_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        return _failure(variant, f"timed out after {VARIANT_TIMEOUT_S}s", None)
    if proc.returncode != 0:
        return _failure(variant, f"exited with {proc.returncode}", proc)
    try:
        return _last_json_line(proc.stdout)
    except ValueError as exc:
        return _failure(variant, f"bad output: {exc}", proc)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a is not None and b else None


def _phases(scenario: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Flatten a scenario into {'sequential': ..., 'c8': ..., 'c32': ...}."""
    flat = {"sequential": scenario["sequential"]}
    flat.update({f"c{c}": r for c, r in scenario.get("concurrent", {}).items()})
    return flat


def compare(variant: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """Per scenario and phase: variant/reference ratios of throughput and p50/p99.

    Throughput ratio < 1 and latency ratio > 1 both mean 'variant is slower'.
    """
    out: dict[str, Any] = {}
    for name, scenario in variant.get("scenarios", {}).items():
        ref_scenario = reference.get("scenarios", {}).get(name)
        if ref_scenario is None:
            continue
        refs = _phases(ref_scenario)
        out[name] = {
            phase: {
                "throughput_ratio": _ratio(r["throughput_per_s"], refs[phase]["throughput_per_s"]),
                "p50_ratio": _ratio(r["p50_ms"], refs[phase]["p50_ms"]),
                "p99_ratio": _ratio(r["p99_ms"], refs[phase]["p99_ms"]),
            }
            for phase, r in _phases(scenario).items()
            if phase in refs
        }
    return out


def comparisons(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``{"vs_floor": {"dbos": {...}}, "vs_dbos": {"engine": {...}}}`` for present references."""
    ok = {n: d for n, d in results.items() if "error" not in d}
    return {
        f"vs_{ref}": {n: compare(d, ok[ref]) for n, d in ok.items() if n != ref}
        for ref in REFERENCES
        if ref in ok
    }


def host_info() -> dict[str, Any]:
    """Enough machine context to tell two result files apart."""
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "node": platform.node()}


def load_average() -> list[float]:
    """1/5/15-minute load: a busy machine (another benchmark, a test run) skews every figure."""
    return [round(x, 2) for x in os.getloadavg()]


def parse_args() -> argparse.Namespace:
    """CLI: the shared plan options, --only and --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_plan_args(parser)
    names = ",".join(v.name for v in VARIANTS)
    parser.add_argument("--only", default=names, help=f"comma-separated subset of {names}")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="also write the document here (default: bench/results/)",
    )
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    wanted = {n for n in args.only.split(",") if n}
    started = dt.datetime.now(dt.UTC)
    load_before = load_average()
    results = {v.name: run_variant(v, plan_argv(args)) for v in VARIANTS if v.name in wanted}
    doc = {
        "schema": "saga-bench/1",
        "started_at": started.isoformat(timespec="seconds"),
        "host": {**host_info(), "loadavg_before": load_before, "loadavg_after": load_average()},
        "plan": plan_dict(plan_from_args(args)),
        "variants": results,
        "comparison": comparisons(results),
    }
    text = json.dumps(doc, indent=2)
    out = args.out or BENCH / "results" / f"baselines-{started:%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(text)
    print(f"[baselines] written to {out}", file=sys.stderr)
    return 1 if any("error" in d for d in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
