"""The pkvm-sim Grafana dashboard, as code (grafana-foundation-sdk, Grafana's own SDK).

    python deploy/grafana/dashboard.py > deploy/grafana/dashboards/pkvm-sim.json

The JSON next to it is this module's output, committed so that Grafana provisions it without
Python; tests/deploy/test_dashboard.py fails when the two differ, and evaluates every query
below with a real Prometheus. Metric names: deploy/metrics.txt.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

from grafana_foundation_sdk.builders import bargauge, dashboard, heatmap, prometheus, stat
from grafana_foundation_sdk.builders import timeseries as ts
from grafana_foundation_sdk.builders.common import (
    ReduceDataOptions,
    StackingConfig,
    VizLegendOptions,
)
from grafana_foundation_sdk.builders.heatmap import HeatmapColorOptions, RowsHeatmapOptions
from grafana_foundation_sdk.cog.builder import Builder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models.dashboard import DataSourceRef
from grafana_foundation_sdk.models.heatmap import HeatmapColorMode, HeatmapColorScale

UID = "pkvm-sim"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="pkvm-prometheus")
JOB = 'job="pkvm-sim", instance=~"$instance"'
POOL = f'{JOB}, pool=~"$pool"'
RATE = "[$__rate_interval]"
# Server-side failures; every other code is the simulator answering a request.
SERVER_ERROR_CODES = "UNKNOWN|INTERNAL|UNAVAILABLE|DATA_LOSS|UNIMPLEMENTED|DEADLINE_EXCEEDED"
GRID_WIDTH = 24


def query(expr: str, legend: str = "__auto", ref: str = "A", *, instant: bool = False
          ) -> prometheus.Dataquery:
    q = prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(DATASOURCE)
    return q.instant() if instant else q.range()


@dataclass
class Layout:
    """Places panels left to right, wrapping at 24 columns; rows start a new line."""

    x: int = 0
    y: int = 0
    line_height: int = 0

    def place(self, width: int, height: int) -> dm.GridPos:
        if self.x + width > GRID_WIDTH:
            self.x, self.y, self.line_height = 0, self.y + self.line_height, 0
        pos = dm.GridPos(h=height, w=width, x=self.x, y=self.y)
        self.x += width
        self.line_height = max(self.line_height, height)
        return pos

    def row(self) -> dm.GridPos:
        if self.x:
            self.x, self.y, self.line_height = 0, self.y + self.line_height, 0
        pos = dm.GridPos(h=1, w=GRID_WIDTH, x=0, y=self.y)
        self.y += 1
        return pos


def series_panel(title: str, description: str, unit: str, *queries: prometheus.Dataquery,
                 stacked: bool = False) -> ts.Panel:
    panel = (
        ts.Panel().title(title).description(description).unit(unit).datasource(DATASOURCE)
        .line_width(1).fill_opacity(10).show_points(common.VisibilityMode.NEVER)
        .legend(VizLegendOptions().show_legend(True).display_mode(common.LegendDisplayMode.LIST)
                .placement(common.LegendPlacement.BOTTOM).calcs([]))
    )
    if stacked:
        panel = panel.stacking(StackingConfig().mode(common.StackingMode.NORMAL))
    for q in queries:
        panel = panel.with_target(q)
    return panel


def stat_panel(title: str, description: str, unit: str, expr: str, legend: str = "__auto"
               ) -> stat.Panel:
    return (
        stat.Panel().title(title).description(description).unit(unit).datasource(DATASOURCE)
        .with_target(query(expr, legend))
        .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .graph_mode(common.BigValueGraphMode.NONE)
    )


def bar_panel(title: str, description: str, unit: str, expr: str, legend: str,
              *, maximum: float | None = None) -> bargauge.Panel:
    panel = (
        bargauge.Panel().title(title).description(description).unit(unit).datasource(DATASOURCE)
        .with_target(query(expr, legend, instant=True))
        .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .orientation(common.VizOrientation.HORIZONTAL)
        .display_mode(common.BarGaugeDisplayMode.BASIC)
    )
    if maximum is not None:
        panel = panel.min(0).max(maximum)
    return panel


def overview() -> list[tuple[Builder[dm.Panel], int, int]]:
    return [
        (stat_panel("Metrics endpoint", "1 while Prometheus scrapes the target.", "none",
                    f"up{{{JOB}}}", "{{instance}}"), 4, 4),
        (stat_panel("Configuration", "pkvm_sim_info: profile (v5.13 to v7.3), hyp_page "
                    "layout (bytes per struct hyp_page) and page size of each instance.", "none",
                    f"max by (profile, layout, page_size, version) (pkvm_sim_info{{{JOB}}})",
                    "{{profile}}, {{layout}}-byte hyp_page, {{page_size}} B pages")
         .text_mode(common.BigValueTextMode.NAME), 6, 4),  # the labels are the point
        (stat_panel("VMs", "VMs alive now.", "none", f"sum(pkvm_vms{{{JOB}}})"), 3, 4),
        (stat_panel("hyp carve-out", "Bytes kvm_hyp_reserve set aside for EL2 (all parts, "
                    "PMD rounding slack included).", "bytes",
                    f"sum by (instance) (pkvm_carveout_bytes{{{JOB}}})", "{{instance}}"), 4, 4),
        (stat_panel("hyp_mem_pages", "The carve-out in pages, as the kernel counts it.", "none",
                    f"max(pkvm_hyp_mem_pages{{{JOB}}})"), 3, 4),
        (stat_panel("Uptime", "Time since the simulator process started.", "s",
                    f"max(time() - process_start_time_seconds{{{JOB}}})"), 4, 4),
    ]


def rpc_panels() -> list[tuple[Builder[dm.Panel], int, int]]:
    handled = f"grpc_server_handled_total{{{JOB}}}"
    buckets = f"grpc_server_handling_seconds_bucket{{{JOB}}}"
    return [
        (series_panel("RPC rate by method", "Completed RPCs a second, by method "
                      "(grpc_server_handled_total).", "reqps",
                      query(f"sum by (grpc_method) (rate({handled}{RATE}))", "{{grpc_method}}")),
         8, 8),
        (series_panel("RPC latency p50 by method", "Median time from the start of a call to "
                      "its status, from the interceptor's histogram.", "s",
                      query(f"histogram_quantile(0.5, sum by (grpc_method, le) "
                            f"(rate({buckets}{RATE})))", "{{grpc_method}}")), 8, 8),
        (series_panel("RPC latency p99 by method", "99th percentile of the same histogram.",
                      "s",
                      query(f"histogram_quantile(0.99, sum by (grpc_method, le) "
                            f"(rate({buckets}{RATE})))", "{{grpc_method}}")), 8, 8),
        (series_panel("Responses by status code", "Completed RPCs a second by gRPC code. "
                      "Codes other than OK are mostly the simulator's refusals.", "reqps",
                      query(f"sum by (grpc_code) (rate({handled}{RATE}))", "{{grpc_code}}"),
                      stacked=True), 8, 8),
        (series_panel("Refusals by reason", "Expected refusals a second, by the reason their "
                      "ErrorInfo carries (ENOMEM, NOT_OWNER, ...).", "reqps",
                      query(f"sum by (reason) (rate(pkvm_grpc_refusals_total{{{JOB}}}{RATE}))",
                            "{{reason}}"), stacked=True), 8, 8),
        (series_panel("Quota refusals", "Calls refused with RESOURCE_EXHAUSTED / "
                      "QUOTA_EXCEEDED, by method: a tenant at its quota.", "reqps",
                      query(f'sum by (grpc_method) (rate(pkvm_grpc_refusals_total{{{JOB}, '
                            f'reason="QUOTA_EXCEEDED"}}{RATE}))', "{{grpc_method}}")), 8, 8),
        (series_panel("Server error ratio", "Share of requests ending in a server-side error "
                      f"({SERVER_ERROR_CODES}); PkvmGrpcServerErrors fires above 5%.",
                      "percentunit",
                      query(f'(sum(rate(pkvm_grpc_requests_total{{{JOB}, '
                            f'code=~"{SERVER_ERROR_CODES}"}}{RATE})) or vector(0)) / '
                            f"(sum(rate(pkvm_grpc_requests_total{{{JOB}}}{RATE})) > 0)",
                            "server errors")), 8, 8),
        (series_panel("RPCs in flight", "Started minus completed RPCs (open Execute streams "
                      "included).", "none",
                      query(f"sum(grpc_server_started_total{{{JOB}}}) - sum({handled})",
                            "in flight")), 8, 8),
        (series_panel("Simulator operations", "Operations the simulator performed a second, "
                      "batched ones included.", "ops",
                      query(f"sum by (op) (rate(pkvm_operations_total{{{JOB}}}{RATE}))",
                            "{{op}}")), 8, 8),
    ]


def process_panels() -> list[tuple[Builder[dm.Panel], int, int]]:
    return [
        (series_panel("CPU", "CPU seconds a second of the simulator process (1 = one core; "
                      "Python's GIL caps it near 1).", "none",
                      query(f"rate(process_cpu_seconds_total{{{JOB}}}{RATE})", "{{instance}}")),
         8, 7),
        (series_panel("Memory", "Resident and virtual size of the simulator process.", "bytes",
                      query(f"process_resident_memory_bytes{{{JOB}}}", "resident {{instance}}"),
                      query(f"process_virtual_memory_bytes{{{JOB}}}", "virtual {{instance}}",
                            "B")), 8, 7),
        (series_panel("File descriptors", "Open descriptors against the limit.", "none",
                      query(f"process_open_fds{{{JOB}}}", "open {{instance}}"),
                      query(f"process_max_fds{{{JOB}}}", "limit {{instance}}", "B")), 8, 7),
    ]


def pool_panels() -> list[tuple[Builder[dm.Panel], int, int]]:
    free_ratio = (f"pkvm_pool_free_pages{{{POOL}}} / ((pkvm_pool_pages{{{POOL}}} - "
                  f"pkvm_pool_reserved_pages{{{POOL}}}) > 0)")
    return [
        (bar_panel("Pool pressure: free share of allocatable pages", "Free pages over pages "
                   "the pool can hand out (reserved ones excluded); PkvmPoolLowFreePages "
                   "fires below 5%.", "percentunit", free_ratio, "{{pool}}", maximum=1), 12, 8),
        (series_panel("Pool occupancy", "Allocated and reserved share of each pool over "
                      "time.", "percentunit",
                      query(f"(pkvm_pool_allocated_pages{{{POOL}}} + "
                            f"pkvm_pool_reserved_pages{{{POOL}}}) / "
                            f"(pkvm_pool_pages{{{POOL}}} > 0)", "{{pool}}")), 12, 8),
        (series_panel("Pool pages by state", "Free, allocated and reserved pages per pool.",
                      "none",
                      query(f"pkvm_pool_free_pages{{{POOL}}}", "free {{pool}}"),
                      query(f"pkvm_pool_allocated_pages{{{POOL}}}", "allocated {{pool}}", "B"),
                      query(f"pkvm_pool_reserved_pages{{{POOL}}}", "reserved {{pool}}", "C")),
         12, 8),
        (series_panel("Allocation failures: expected and not", "ENOMEM a second per pool "
                      "(expected ones included: requests to a drained pool, host stage-2 "
                      "before a recycle) and host stage-2 faults still out of pages after a "
                      "recycle (unexpected: PkvmPoolAllocFailures).", "ops",
                      query(f"sum by (pool) (rate(pkvm_pool_alloc_failures_total{{{POOL}}}"
                            f"{RATE}))", "ENOMEM {{pool}}"),
                      query(f"sum(rate(pkvm_host_s2_map_failures_total{{{JOB}}}{RATE}))",
                            "unexpected: host stage-2 map failures", "B")), 12, 8),
    ]


def fragmentation_panels() -> list[tuple[Builder[dm.Panel], int, int]]:
    blocks_heatmap = (
        heatmap.Panel().title("Free blocks per order (heatmap)")
        .description("Free blocks on each buddy order's free list over time, summed over the "
                     "selected pools; a shift toward low orders is fragmentation.")
        .datasource(DATASOURCE).unit("short")
        .with_target(query(f"sum by (order) (pkvm_pool_free_blocks{{{POOL}}})", "{{order}}"))
        .calculate(False)
        .rows_frame(RowsHeatmapOptions().layout(common.HeatmapCellLayout.UNKNOWN).value("blocks"))
        .color(HeatmapColorOptions().mode(HeatmapColorMode.SCHEME).scheme("Oranges")
               .fill("dark-orange").scale(HeatmapColorScale.EXPONENTIAL)
               .exponent(0.5).steps(64).reverse(False))
    )
    return [
        (blocks_heatmap, 12, 9),
        (bar_panel("Free blocks by order, now", "The free lists as they are, per pool and "
                   "order.", "none",
                   f"sum by (pool, order) (pkvm_pool_free_blocks{{{POOL}}})",
                   "{{pool}} order {{order}}"), 12, 9),
        (series_panel("Unusable free space index", "Share of free pages that cannot serve an "
                      "allocation of each order (0: all can, 1: none can), per pool.",
                      "percentunit",
                      query(f"pkvm_pool_unusable_free_index{{{POOL}}}",
                            "{{pool}} order {{order}}")), 12, 8),
        (series_panel("Largest free order", "The highest order with a free block: the "
                      "largest allocation that can succeed now (-1: none).", "none",
                      query(f"pkvm_pool_largest_free_order{{{POOL}}}", "{{pool}}")), 12, 8),
    ]


def overhead_panels() -> list[tuple[Builder[dm.Panel], int, int]]:
    return [
        (bar_panel("Carve-out by part", "Bytes of the EL2 carve-out per part: vmemmap, hyp "
                   "pool, host stage-2 pool(s), rounding slack.", "bytes",
                   f"max by (part) (pkvm_carveout_bytes{{{JOB}}})", "{{part}}"), 8, 8),
        (bar_panel("hyp_vmemmap per layout", "What the covered memory's hyp_vmemmap costs with "
                   "a 32-byte (v5.13), 8-byte (v6.18, v7.3), 4-byte (v5.14 to v6.12) or "
                   "2-byte struct hyp_page.", "bytes",
                   f"max by (layout) (pkvm_vmemmap_layout_bytes{{{JOB}}})",
                   "{{layout}}-byte hyp_page"), 8, 8),
        (series_panel("hyp_vmemmap overhead", "hyp_vmemmap bytes per byte of covered memory "
                      "and its size.", "percentunit",
                      query(f"max(pkvm_vmemmap_bytes_per_gib{{{JOB}}}) / 1073741824",
                            "per byte covered"),
                      query(f"max(pkvm_vmemmap_bytes{{{JOB}}}) / "
                            f"sum(pkvm_carveout_bytes{{{JOB}}})",
                            "vmemmap / carve-out (the vmemmap lies outside it from v6.2)",
                            "B")), 8, 8),
    ]


def host_stage2_panels() -> list[tuple[Builder[dm.Panel], int, int]]:
    return [
        (series_panel("MMIO recycles", "unmap_dev_all runs a second (host stage-2 ran out of "
                      "table pages) and the table pages they freed.", "ops",
                      query(f"sum(rate(pkvm_host_s2_mmio_recycles_total{{{JOB}}}{RATE}))",
                            "recycles"),
                      query(f"sum(rate(pkvm_host_s2_mmio_recycled_pages_total{{{JOB}}}"
                            f"{RATE}))", "pages freed", "B")), 8, 8),
        (series_panel("Host stage-2 faults", "Faults a second by kind, and the spurious ones "
                      "(already mapped, -EAGAIN).", "ops",
                      query(f"sum by (kind) (rate(pkvm_host_s2_faults_total{{{JOB}}}{RATE}))",
                            "{{kind}}"),
                      query(f"sum(rate(pkvm_host_s2_spurious_faults_total{{{JOB}}}{RATE}))",
                            "spurious", "B")), 8, 8),
        (series_panel("Host stage-2 fault failures", "Faults a second that could not be "
                      "mapped, by kind.", "ops",
                      query(f"sum by (kind) (rate(pkvm_host_s2_fault_failures_total{{{JOB}}}"
                            f"{RATE}))", "{{kind}}")), 8, 8),
    ]


def guest_panels() -> list[tuple[Builder[dm.Panel], int, int]]:
    return [
        (series_panel("VMs", "VMs alive, pages shared, and VMs reaped at lease expiry.",
                      "none",
                      query(f"sum(pkvm_vms{{{JOB}}})", "VMs"),
                      query(f"sum(pkvm_shared_pages{{{JOB}}})", "shared pages", "B"),
                      query(f"sum(increase(pkvm_vms_expired_total{{{JOB}}}{RATE}))",
                            "expired", "C")), 12, 8),
        (series_panel("Refcount limit hits", "Stage-2 table entries refused a second because "
                      "the table page's hyp_page refcount was at its limit.", "ops",
                      query(f"sum(rate(pkvm_refcount_limit_hits_total{{{JOB}}}{RATE}))",
                            "hits")), 12, 8),
    ]


SECTIONS = (
    ("Overview", overview),
    ("gRPC service", rpc_panels),
    ("Pools", pool_panels),
    ("Fragmentation (buddy free lists)", fragmentation_panels),
    ("Carve-out and vmemmap overhead", overhead_panels),
    ("Host stage-2", host_stage2_panels),
    ("Guests and sharing", guest_panels),
    ("Process", process_panels),
)


def variable(name: str, label: str, expr: str) -> dashboard.QueryVariable:
    return (
        dashboard.QueryVariable(name).label(label).datasource(DATASOURCE)
        .query(expr)
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .include_all(True).multi(True).all_value(".*")
        .sort(dm.VariableSort.ALPHABETICAL_ASC)
    )


INTERVAL_ONLY_KEYS = ("auto", "auto_count", "auto_min")


def build() -> dict[str, Any]:
    """The dashboard as a JSON-ready dict."""
    board = (
        dashboard.Dashboard("pkvm-sim").uid(UID)
        .description("pKVM EL2 memory manager simulator: gRPC service, hyp pools, buddy "
                     "fragmentation, carve-out and vmemmap overhead, host stage-2, guests.")
        .tags(["pkvm", "kvm", "arm64"]).timezone("browser").editable().tooltip(
            dm.DashboardCursorSync.CROSSHAIR)
        .refresh("5s").time("now-30m", "now")
        .timepicker(dashboard.TimePicker().refresh_intervals(["5s", "10s", "30s", "1m", "5m"]))
        .with_variable(variable("instance", "Instance", 'label_values(up{job="pkvm-sim"}, '
                                "instance)"))
        .with_variable(variable("pool", "Pool", f"label_values(pkvm_pool_pages{{{JOB}}}, pool)"))
    )
    layout = Layout()
    panel_id = 0
    for title, section in SECTIONS:
        panel_id += 1
        board = board.with_row(dashboard.Row(title).id(panel_id).grid_pos(layout.row()))
        for panel, width, height in section():
            panel_id += 1
            board = board.with_panel(panel.id(panel_id).grid_pos(layout.place(width, height)))  # type: ignore[attr-defined]
    encoded: dict[str, Any] = json.loads(json.dumps(board.build(), cls=JSONEncoder))
    for var in encoded["templating"]["list"]:
        # The SDK writes an interval variable's auto settings on every variable; Grafana's
        # published types (and Grafana's own JSON) have them on interval variables only.
        for key in INTERVAL_ONLY_KEYS:
            var.pop(key, None)
    return encoded


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=False) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
