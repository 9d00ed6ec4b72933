"""The --html report: one self-contained file (pictures embedded as PNG data URIs) drawn
from the report dict alone. Needs matplotlib (`pip install 'pkvm-sim[load]'`).
"""

from __future__ import annotations

import base64
import html
import io
import json
from typing import Any

from .report import LATENCY_KEYS, RESULT_OK

MISSING_MATPLOTLIB = "--html needs matplotlib: pip install 'pkvm-sim[load]'"
# One colour per operation, the same in every picture; no two operations share one. The
# VM lifecycle (create, destroy) is drawn in black and grey, dashed.
OPERATION_COLOURS = {
    "alloc": "#1f77b4", "put": "#ff7f0e", "get": "#2ca02c", "share": "#d62728",
    "unshare": "#9467bd", "pin": "#8c564b", "unpin": "#e377c2", "guest_map": "#bcbd22",
    "topup": "#17becf", "mmio": "#393b79", "create_vm": "#000000", "destroy_vm": "#7f7f7f",
}
SPARE_COLOURS = ("#637939", "#843c39", "#7b4173", "#e7ba52", "#3182bd", "#31a354")
LIFECYCLE = ("create_vm", "destroy_vm")
MAX_ANNOTATED_SAMPLES = 40  # a heatmap with at most this many samples shows its counts


def operation_style(op: str, index: int) -> dict[str, Any]:
    """Matplotlib line style of an operation: its own colour (a spare one for an operation
    this table does not know), dashed for the VM lifecycle."""
    colour = OPERATION_COLOURS.get(op, SPARE_COLOURS[index % len(SPARE_COLOURS)])
    return {"color": colour, "linestyle": "--" if op in LIFECYCLE else "-"}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def latency_picture(report: dict[str, Any]) -> str:
    """Latency by percentile, per operation, on the usual HdrHistogram axes: x stretches
    the tail (1 / (1 - q)), so p99, p99.9 and p99.99 are equally far apart."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(11, 4.8))
    for index, (op, fig_op) in enumerate(report["operations"].items()):
        points = [(q, ms) for q, ms in fig_op["distribution_ms"] if q < 100.0]
        xs = [1 / (1 - q / 100) for q, _ms in points]
        ax.plot(xs, [max(ms, 0.001) for _q, ms in points], marker=".", label=op,
                **operation_style(op, index))
    ticks = [1, 2, 10, 100, 1000, 10000, 100000]
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(ticks, ["0%", "50%", "90%", "99%", "99.9%", "99.99%", "99.999%"])
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency (ms, log)")
    ax.set_title("Latency distribution per operation")
    ax.grid(True, which="major", alpha=0.4)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _png(fig)


def throughput_picture(report: dict[str, Any]) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(11, 4))
    timeline = report["timeline"]
    # Each point is one bucket's rate at the bucket's middle (the last bucket may be short).
    ts = [row["t"] + row["span_s"] / 2 for row in timeline]
    for key, label, color in (("ok", "ok / s", "tab:green"),
                              ("expected", "expected refusals / s", "tab:orange"),
                              ("unexpected", "unexpected errors / s", "tab:red")):
        ax.plot(ts, [row[key] / row["span_s"] for row in timeline], label=label, color=color,
                marker=".")
    ax.set_xlabel("seconds since the end of the warm-up")
    ax.set_ylabel("operations per second")
    ax.set_ylim(bottom=0)
    ax.set_title("Throughput and errors over time")
    ax.grid(True, alpha=0.4)
    ax.legend(loc="lower right", fontsize="small")
    return _png(fig)


def latency_over_time_picture(report: dict[str, Any]) -> str:
    """Above: p50, p99 and max of all operations per second. Below: each operation's mean
    latency per second, in its own colour. Both on a log scale: a stall stands out."""
    plt = _pyplot()
    rows = report["latency_timeline"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 6.4), sharex=True)
    ts = [row["t"] + 0.5 for row in rows]  # each second drawn at its middle
    for key, label, colour in (("max_ms", "max", "#d62728"), ("p99_ms", "p99", "#ff7f0e"),
                               ("p50_ms", "p50", "#1f77b4")):
        top.plot(ts, [max(row[key], 0.001) for row in rows], label=label, color=colour,
                 marker=".")
    top.set_yscale("log")
    top.set_ylabel("latency (ms, log)")
    top.set_title("Latency over time: all operations, per second")
    top.grid(True, which="major", alpha=0.4)
    top.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    for index, op in enumerate(report["operations"]):
        points = [(row["t"] + 0.5, row["mean_ms"][op]) for row in rows if op in row["mean_ms"]]
        if points:
            bottom.plot([t for t, _ in points], [max(ms, 0.001) for _, ms in points],
                        label=op, marker=".", **operation_style(op, index))
    bottom.set_yscale("log")
    bottom.set_xlabel("seconds since the end of the warm-up")
    bottom.set_ylabel("mean latency (ms, log)")
    bottom.set_title("Mean latency per operation, per second")
    bottom.grid(True, which="major", alpha=0.4)
    bottom.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _png(fig)


def free_blocks_heatmap(report: dict[str, Any], name: str) -> str:
    """Time x order: each cell is the pool's free blocks of that order in that sample,
    coloured on a log scale; a white cell has none. Fragmentation reads at a glance: colour
    drains from the high orders and gathers in the low ones."""
    import numpy as np
    from matplotlib.colors import LogNorm

    plt = _pyplot()
    samples = report["pools"]
    counts = [s["pools"][name]["free_blocks_per_order"] for s in samples if name in s["pools"]]
    ts = [s["t"] for s in samples if name in s["pools"]]
    orders = max(1, max(len(c) for c in counts))
    grid = np.ma.masked_equal(np.array([[_at(c, o) for c in counts] for o in range(orders)],
                                       dtype=float), 0)
    # Cell edges: halfway between samples, so uneven sampling keeps its true times.
    mids = [(a + b) / 2 for a, b in zip(ts, ts[1:], strict=False)]
    first = ts[0] - (mids[0] - ts[0] if mids else 0.5)
    last = ts[-1] + (ts[-1] - mids[-1] if mids else 0.5)
    edges = [first, *mids, last]
    fig, ax = plt.subplots(figsize=(11, 1.6 + 0.28 * orders))
    highest = max(2.0, float(grid.max()) if grid.count() else 1.0)
    mesh = ax.pcolormesh(edges, np.arange(orders + 1) - 0.5, grid, cmap="viridis",
                         norm=LogNorm(vmin=1, vmax=highest), shading="flat")
    bar = fig.colorbar(mesh, ax=ax, label="free blocks (log scale)", pad=0.01)
    ticks = [t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 100000)
             if t <= highest]
    bar.set_ticks(ticks, labels=[str(t) for t in ticks])
    bar.minorticks_off()
    if len(ts) <= MAX_ANNOTATED_SAMPLES:  # few cells: write each count in its cell
        widths = [b - a for a, b in zip(edges, edges[1:], strict=False)]
        wide = sorted(widths)[len(widths) // 2] * 0.6  # the last sample's cell may be a sliver
        for order in range(orders):
            for column, t in enumerate(ts):
                value = grid[order, column]
                if value is not np.ma.masked and widths[column] >= wide:
                    bright = mesh.norm(value) > 0.6  # viridis turns yellow: dark text
                    ax.text(t, order, f"{int(value)}", ha="center", va="center",
                            fontsize=7, color="black" if bright else "white")
    ax.set_yticks(range(orders))
    ax.set_ylabel("order")
    ax.set_xlabel("seconds since the end of the warm-up")
    ax.set_title(f"{name} pool: free blocks per order over time (white: none)")
    return _png(fig)


def pool_pictures(report: dict[str, Any]) -> list[tuple[str, str]]:
    """Free pages of every shared pool, then free blocks per order of each of them."""
    samples = report["pools"]
    if not samples:
        return []
    plt = _pyplot()
    ts = [s["t"] for s in samples]
    names = list(samples[0]["pools"])
    pictures = []
    fig, ax = plt.subplots(figsize=(11, 4))
    for name in names:
        ax.plot(ts, [s["pools"][name]["free_pages"] for s in samples], label=name)
    ax.set_xlabel("seconds since the end of the warm-up")
    ax.set_ylabel("free pages")
    ax.set_ylim(bottom=0)
    ax.set_title("Pool free pages over time (GetStats)")
    ax.grid(True, alpha=0.4)
    ax.legend(fontsize="small")
    pictures.append(("Pool free pages", _png(fig)))
    for name in names:
        pictures.append((f"{name}: free blocks per order", free_blocks_heatmap(report, name)))
    return pictures


def _at(values: list[int], index: int) -> int:
    return values[index] if index < len(values) else 0


def render(report: dict[str, Any]) -> str:
    esc = html.escape
    shape = report["shape"]
    loop = f"open loop at {shape['rps']:g} ops/s" if shape["rps"] else "closed loop"
    rows = "".join(
        f"<tr><td>{esc(op)}</td><td>{f['count']}</td><td>{f['ops_per_s']:,.1f}</td>"
        f"<td>{f['expected_refusals']}</td><td class='{'bad' if f['unexpected'] else ''}'>"
        f"{f['unexpected']}</td>"
        + "".join(f"<td>{f['latency_ms'][k]:.3f}</td>" for k in LATENCY_KEYS) + "</tr>"
        for op, f in report["operations"].items())
    head = "".join(f"<th>{k.replace('_', '.')}</th>" for k in LATENCY_KEYS)
    outcomes = "".join(f"<li>{esc(k)}: {v}</li>" for k, v in report["expected_refusals"].items())
    unexpected = "".join(f"<li>{esc(k)}: {v}</li>" for k, v in report["unexpected"].items())
    leak = report["leak_check"]
    problems = "".join(f"<li>{esc(p)}</li>" for p in leak["problems"][:50])
    pictures = [("Latency distribution", latency_picture(report)),
                ("Latency over time", latency_over_time_picture(report)),
                ("Throughput and errors", throughput_picture(report)),
                *pool_pictures(report)]
    figures = "".join(f"<figure><img alt='{esc(title)}' src='{uri}'>"
                      f"<figcaption>{esc(title)}</figcaption></figure>"
                      for title, uri in pictures)
    verdict = report["result"].upper() if report["result"] != RESULT_OK else RESULT_OK
    reasons = "".join(f"<li>{esc(r)}</li>" for r in report["reasons"])
    server = report["server"]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>pkvm-sim load: {esc(report['workload']['name'])} ({verdict})</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1200px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
th {{ background: #f0f0f0; }}
.bad {{ color: #b00; font-weight: bold; }}
table.meta td {{ text-align: left; }}
.ok {{ color: #070; font-weight: bold; }}
figure {{ margin: 1.5em 0; }} img {{ max-width: 100%; }}
figcaption {{ color: #555; font-size: 90%; }}
</style></head><body>
<h1>pkvm-sim load: {esc(report['workload']['name'])}
 <span class="{'ok' if verdict == RESULT_OK else 'bad'}">{verdict}</span></h1>
<table class="meta">
<tr><th>generated</th><td>{esc(report['generated_at'])}</td></tr>
<tr><th>tool</th><td>pkvm-sim {esc(report['tool_version'])}</td></tr>
<tr><th>target</th><td>{esc(report['target'])}</td></tr>
<tr><th>server profile</th><td>{esc(server['profile'] or '?')}</td></tr>
<tr><th>server instance</th><td>{esc(server['instance_id'] or '?')}</td></tr>
<tr><th>result</th><td class="{'ok' if verdict == RESULT_OK else 'bad'}">{verdict}
 (exit {report['exit_code']})</td></tr></table>
{f'<ul class="bad">{reasons}</ul>' if reasons else ''}
<p>{esc(report['target'])}: {report['vms_started']}/{shape['vms']} VMs over
{shape['connections']} connection(s), {loop}{f", batches of {shape['batch']}"
if shape['batch'] else ""}; {report['duration_s']:g} s measured after {shape['warmup']:g} s
warm-up, seed {shape['seed']}.</p>
<p><b>{report['operations_total']}</b> operations, <b>{report['achieved_rps']:,.1f}</b>
ops/s. Codes: {esc(', '.join(f'{k}={v}' for k, v in report['codes'].items()))}.</p>
<table><tr><th>operation</th><th>count</th><th>ops/s</th><th>expected refusals</th>
<th>unexpected</th>{head}</tr>{rows}</table>
<p>Latencies in milliseconds{', measured from the intended send time' if shape['rps'] else ''}.
An operation inside an Execute batch is charged the batch's round trip.</p>
<h2>Refusals</h2>
<p>Expected (what a loaded pool or a quota answers):</p><ul>{outcomes or '<li>none</li>'}</ul>
<p>Unexpected (these fail the run):</p>
<ul{' class="bad"' if unexpected else ''}>{unexpected or '<li>none</li>'}</ul>
<h2>Leak check</h2>
<p>{leak['vms_created']} VMs created, {leak['vms_destroyed']} destroyed;
{'every VM gave back what its ledger says' if not leak['problems'] else 'problems:'}</p>
<ul class="bad">{problems}</ul><p>Server-wide: {esc(leak['server_wide'])}</p>
<h2>Pictures</h2>{figures}
<details><summary>Workload</summary><pre>{esc(json.dumps(report['workload'], indent=2))}</pre>
</details>
</body></html>
"""
