"""A run's report: one dict (the --json file), and the terminal table and --csv file made
from it. `html.py` draws the --html file from the same dict, so every picture can be redrawn
from the JSON alone.
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict
from typing import Any

from .recorder import OK, Recorder
from .runner import RunResult, Shape
from .workloads import Workload

LATENCY_KEYS = ("min", "mean", "p50", "p90", "p99", "p99_9", "max")
PERCENTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p99_9": 99.9}
# Where the latency distribution is sampled for the picture (and kept in the JSON).
DISTRIBUTION_AT = (0.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99,
                   99.999, 100.0)
CSV_COLUMNS = ("operation", "count", "ok", "expected_refusals", "unexpected", "ops_per_s",
               "min", "mean", "p50", "p90", "p99", "p99_9", "max")


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


def build_report(shape: Shape, workload: Workload, result: RunResult) -> dict[str, Any]:
    recorder, seconds = result.recorder, result.measured_s
    expected, unexpected = recorder.split_outcomes()
    total = recorder.measured_ops
    leak = result.leak
    ok = not unexpected and leak.ok
    return {
        "tool": "pkvm-sim load",
        "target": shape.target,
        "workload": {"name": workload.name, "weights": workload.weights,
                     "orders": list(workload.orders),
                     "lifecycle_calls": workload.lifecycle_calls},
        "shape": {k: v for k, v in asdict(shape).items()
                  if k not in ("target", "progress", "progress_interval")},
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
        "pools": [{"t": round(sample.t, 3), "nr_vms": sample.server.nr_vms,
                   "mmio_recycles": sample.server.mmio_recycles,
                   "pools": {p.name: {"free_pages": p.free_pages, "total_pages": p.total_pages,
                                      "free_blocks_per_order": list(p.free_blocks_per_order)}
                             for p in sample.server.pools}}
                  for sample in recorder.samples],
        "leak_check": {"ok": leak.ok, "vms_created": leak.vms_created,
                       "vms_destroyed": leak.vms_destroyed, "problems": leak.problems,
                       "server_wide": leak.server_wide},
        "result": "ok" if ok else "failed",
        "exit_code": 0 if ok else 1,
    }


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
    writer.writerow(CSV_COLUMNS)
    for op, fig in report["operations"].items():
        writer.writerow([op, fig["count"], fig["ok"], fig["expected_refusals"],
                         fig["unexpected"], fig["ops_per_s"],
                         *(fig["latency_ms"][k] for k in LATENCY_KEYS)])
    return buffer.getvalue()


def table_text(report: dict[str, Any]) -> str:
    """The terminal summary."""
    shape = report["shape"]
    loop = f"open loop at {shape['rps']:g} ops/s" if shape["rps"] else "closed loop"
    lines = [
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
    lines.append(f"result: {report['result']} (exit {report['exit_code']})")
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
