"""A run's report: one dict (the --json file), and the terminal table and --csv file made
from it. `html.py` draws the --html file from the same dict, so every picture can be redrawn
from the JSON alone.

The verdict is a contract (README, "The load tool's verdict"): `ok` (exit 0) only when the
run made what it was asked (every VM, the whole duration or total), nothing unexpected came
back, the leak check passed and every report was written; `failed` (exit 1) lists why;
`interrupted` (exit 128 + the signal's number: 130 for SIGINT, 143 for SIGTERM) when a signal
stopped it. Every format carries when it ran, the tool's version, the target and the server's
profile and instance id.
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from pkvm_sim import __version__

from .recorder import OK, Recorder
from .runner import RunResult, Shape
from .workloads import Workload

EXIT_OK = 0
EXIT_FAILED = 1
RESULT_OK, RESULT_FAILED, RESULT_INTERRUPTED = "ok", "failed", "interrupted"

LATENCY_KEYS = ("min", "mean", "p50", "p90", "p99", "p99_9", "max")
PERCENTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p99_9": 99.9}
# Where the latency distribution is sampled for the picture (and kept in the JSON).
DISTRIBUTION_AT = (0.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99,
                   99.999, 100.0)
CSV_COLUMNS = ("operation", "count", "ok", "expected_refusals", "unexpected", "ops_per_s",
               "min", "mean", "p50", "p90", "p99", "p99_9", "max")
# The run's identity, repeated on every CSV row so that rows of many runs can be concatenated.
CSV_RUN_COLUMNS = ("generated_at", "tool_version", "target", "server_profile",
                   "server_instance_id", "result")


def _ms(micros: float) -> float:
    return round(micros / 1000, 3)


def latency_ms(histogram: Any) -> dict[str, float]:
    figures = {"min": _ms(histogram.get_min_value()), "mean": _ms(histogram.get_mean_value()),
               "max": _ms(histogram.get_max_value())}
    for key, q in PERCENTILES.items():
        figures[key] = _ms(histogram.get_value_at_percentile(q))
    return {key: figures[key] for key in LATENCY_KEYS}


def operation_figures(recorder: Recorder, seconds: float) -> dict[str, Any]:
    expected, unexpected = recorder.split_outcomes()
    operations: dict[str, Any] = {}
    for op, histogram in sorted(recorder.histograms.items()):
        count = int(histogram.get_total_count())
        outcomes = {key: n for (o, key), n in sorted(recorder.outcomes.items()) if o == op}
        operations[op] = {
            "count": count,
            "ok": outcomes.get(OK, 0),
            "expected_refusals": sum(n for k, n in expected.items() if k.startswith(op + ":")),
            "unexpected": sum(n for k, n in unexpected.items() if k.startswith(op + ":")),
            "ops_per_s": round(count / seconds, 1) if seconds else 0.0,
            "latency_ms": latency_ms(histogram),
            "distribution_ms": [[q, _ms(histogram.get_value_at_percentile(q))]
                                for q in DISTRIBUTION_AT],
            "outcomes": outcomes,
        }
    return operations


def shortfalls(shape: Shape, result: RunResult, unexpected: dict[str, int]) -> list[str]:
    """Why the run is not what was asked, one sentence each (empty: it is)."""
    reasons = []
    measured_s, ops = result.measured_s, result.recorder.measured_ops
    if result.interrupted:
        reasons.append(f"interrupted by {result.interrupted} after {measured_s:.1f} s measured")
    if result.vms_started < shape.vms:
        why = f" (first refusal: {result.first_create_refusal})" \
            if result.first_create_refusal else ""
        reasons.append(f"created {result.vms_started} of {shape.vms} VMs{why}")
    if result.vms_lost:
        reasons.append(f"{result.vms_lost} VM(s) stopped early: a recycle could not create"
                       " the next VM")
    # --max-ops ends each VM when it is reached: a run that stops there did what it was asked.
    if not result.interrupted and not shape.max_ops:
        if shape.total is not None and ops < shape.total:
            reasons.append(f"measured {ops} of {shape.total} operations")
        if shape.duration is not None and measured_s < shape.duration - 1e-3:
            reasons.append(f"measured {measured_s:.1f} of {shape.duration:g} s")
    if unexpected:
        reasons.append(f"{sum(unexpected.values())} unexpected answer(s)")
    if not result.leak.ok:
        reasons.append("the leak check failed")
    return reasons


def decide(report: dict[str, Any], interrupted_exit: int | None = None) -> None:
    """Set `result` and `exit_code` from the report's `reasons` (see the module doc)."""
    if report["interrupted"]:
        report["result"] = RESULT_INTERRUPTED
        report["exit_code"] = interrupted_exit if interrupted_exit is not None else EXIT_FAILED
    elif report["reasons"]:
        report["result"], report["exit_code"] = RESULT_FAILED, EXIT_FAILED
    else:
        report["result"], report["exit_code"] = RESULT_OK, EXIT_OK


def build_report(shape: Shape, workload: Workload, result: RunResult,
                 interrupted_exit: int | None = None) -> dict[str, Any]:
    recorder, seconds = result.recorder, result.measured_s
    expected, unexpected = recorder.split_outcomes()
    total = recorder.measured_ops
    leak = result.leak
    report: dict[str, Any] = {
        "tool": "pkvm-sim load",
        "tool_version": __version__,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "target": shape.target,
        "server": {"profile": result.server.profile, "instance_id": result.server.instance_id,
                   "page_size": result.server.page_size},
        "workload": {"name": workload.name, "weights": workload.weights,
                     "orders": list(workload.orders),
                     "lifecycle_calls": workload.lifecycle_calls},
        "shape": {k: v for k, v in asdict(shape).items()
                  if k not in ("target", "progress", "progress_interval", "connection")},
        "connection": shape.connection.describe(),
        "loop": "open" if shape.rps else "closed",
        "vms_started": result.vms_started,
        "duration_s": round(seconds, 3),
        "operations_total": total,
        "achieved_rps": round(total / seconds, 1) if seconds else 0.0,
        "codes": recorder.codes(),
        "operations": operation_figures(recorder, seconds),
        "expected_refusals": expected,
        "unexpected": unexpected,
        "latency_clamped": recorder.clamped,
        "timeline": timeline(recorder, seconds),
        "latency_timeline": latency_timeline(recorder),
        "pools": [{"t": round(sample.t, 3), "nr_vms": sample.server.nr_vms,
                   "mmio_recycles": sample.server.mmio_recycles,
                   "pools": {p.name: {"free_pages": p.free_pages, "total_pages": p.total_pages,
                                      "free_blocks_per_order": list(p.free_blocks_per_order)}
                             for p in sample.server.pools}}
                  for sample in recorder.samples],
        "leak_check": {"ok": leak.ok, "vms_created": leak.vms_created,
                       "vms_destroyed": leak.vms_destroyed, "problems": leak.problems,
                       "server_wide": leak.server_wide},
        "interrupted": result.interrupted,
        "reasons": shortfalls(shape, result, unexpected),
        "reports_not_written": [],
    }
    decide(report, interrupted_exit)
    return report


def latency_timeline(recorder: Recorder) -> list[dict[str, Any]]:
    """Per second of the run: p50, p99 and max of every operation completed in it (within
    a 12% bucket, see recorder.py), and each operation's mean."""
    rows = []
    for s in sorted(recorder.latency_seconds):
        second = recorder.latency_seconds[s]
        rows.append({"t": s, "p50_ms": _ms(second.percentile_us(50)),
                     "p99_ms": _ms(second.percentile_us(99)), "max_ms": _ms(second.max_us),
                     "mean_ms": {op: _ms(second.mean_us(op))
                                 for op in sorted(second.count_by_op)}})
    return rows


def timeline(recorder: Recorder, seconds: float) -> list[dict[str, Any]]:
    """Outcomes per one-second bucket; `span_s` is the bucket's length (the last one may be
    shorter), so rate = count / span_s."""
    last = max(max(recorder.seconds, default=0), int(seconds - 1e-9))
    rows = []
    for s in range(last + 1):
        counts = asdict(recorder.seconds[s]) if s in recorder.seconds else \
            {"ok": 0, "expected": 0, "unexpected": 0}
        span = max(0.001, min(1.0, seconds - s)) if s == last else 1.0
        rows.append({"t": s, "span_s": round(span, 3), **counts})
    return rows


def csv_text(report: dict[str, Any]) -> str:
    """One row per operation; latencies in milliseconds."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS + CSV_RUN_COLUMNS)
    run = [report["generated_at"], report["tool_version"], report["target"],
           report["server"]["profile"], report["server"]["instance_id"], report["result"]]
    for op, fig in report["operations"].items():
        writer.writerow([op, fig["count"], fig["ok"], fig["expected_refusals"],
                         fig["unexpected"], fig["ops_per_s"],
                         *(fig["latency_ms"][k] for k in LATENCY_KEYS), *run])
    return buffer.getvalue()


def identity_line(report: dict[str, Any]) -> str:
    """When, which tool and which server: the line that lets an archived report be placed."""
    server = report["server"]
    return (f"{report['generated_at']}  pkvm-sim {report['tool_version']}  target"
            f" {report['target']}  server profile {server['profile'] or '?'}, instance"
            f" {server['instance_id'] or '?'}")


def verdict_lines(report: dict[str, Any]) -> list[str]:
    lines = [f"result: {report['result']} (exit {report['exit_code']})"]
    lines.extend(f"  {reason}" for reason in report["reasons"])
    return lines


def table_text(report: dict[str, Any]) -> str:
    """The terminal summary."""
    shape = report["shape"]
    loop = f"open loop at {shape['rps']:g} ops/s" if shape["rps"] else "closed loop"
    lines = [
        identity_line(report),
        f"pkvm-sim load: {report['workload']['name']} on {report['target']}:"
        f" {report['vms_started']}/{shape['vms']} VMs over {shape['connections']}"
        f" connection(s), {loop}" + (f", batches of {shape['batch']}" if shape["batch"] else "")
        + f", {report['duration_s']:g} s measured after {shape['warmup']:g} s warm-up",
        f"{report['operations_total']} operations, {report['achieved_rps']:,.1f} ops/s",
        "",
        f"{'operation':<12}{'count':>9}{'ops/s':>10}{'refused':>9}"
        + "".join(f"{k.replace('_', '.'):>9}" for k in LATENCY_KEYS) + "   (latency ms)",
    ]
    for op, fig in report["operations"].items():
        refused = fig["expected_refusals"] + fig["unexpected"]
        lines.append(f"{op:<12}{fig['count']:>9}{fig['ops_per_s']:>10,.1f}{refused:>9}"
                     + "".join(f"{fig['latency_ms'][k]:>9.3f}" for k in LATENCY_KEYS))
    lines.append("")
    lines.append("codes: " + ", ".join(f"{k}={v}" for k, v in report["codes"].items()))
    if report["expected_refusals"]:
        lines.append("expected refusals (a loaded pool's answers, not failures): "
                     + ", ".join(f"{k}={v}" for k, v in report["expected_refusals"].items()))
    if report["unexpected"]:
        lines.append("UNEXPECTED: " + ", ".join(f"{k}={v}"
                                               for k, v in report["unexpected"].items()))
    lines.extend(_pool_lines(report))
    leak = report["leak_check"]
    lines.append(f"leak check: {leak['vms_created']} VMs created, {leak['vms_destroyed']}"
                 f" destroyed, " + ("every ledger matched" if not leak["problems"]
                                    else f"{len(leak['problems'])} PROBLEM(S)"))
    lines.extend(f"  {p}" for p in leak["problems"][:20])
    lines.append(f"  server-wide: {leak['server_wide']}")
    lines.extend(verdict_lines(report))
    return "\n".join(lines) + "\n"


def _pool_lines(report: dict[str, Any]) -> list[str]:
    samples = report["pools"]
    if not samples:
        return []
    names = list(samples[0]["pools"])
    parts = []
    for name in names:
        free = [s["pools"][name]["free_pages"] for s in samples if name in s["pools"]]
        parts.append(f"{name} {min(free)}..{max(free)}")
    recycles = samples[-1]["mmio_recycles"] - samples[0]["mmio_recycles"]
    return [f"pool free pages over {len(samples)} samples (min..max): " + ", ".join(parts)
            + f"; host stage-2 MMIO recycles during the run: {recycles}"]
