"""deploy/grafana/dashboards/pkvm-sim.json, checked without a Grafana server.

- Grafana's own dashboard and panel-options types (npm @grafana/schema, pinned in
  deploy/grafana/schema-check/), turned into JSON schemas by ts-json-schema-generator.
- Layout: unique panel ids, a gridPos on every panel, no two panels overlapping.
- Every datasource reference is the provisioned Prometheus datasource's uid.
- Every query: valid PromQL (promtool, as recording rules), only catalogued metric names and
  labels, and a non-empty answer from a real Prometheus scraping synthetic pkvm-sim metrics.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from tests.deploy.catalog import (
    DASHBOARD_JSON,
    DEPLOY_DIR,
    all_panels,
    as_promql,
    catalogue_problems,
    dashboard_exprs,
    load_dashboard,
    load_metric_catalog,
    load_yaml,
    recording_rule_names,
    rule_exprs,
)
from tests.prometheus_harness import (
    PrometheusHandle,
    free_loopback_port,
    require_binary,
    running_prometheus,
)
from tests.unavailable import unavailable

SCHEMA_CHECK_DIR = DEPLOY_DIR / "grafana" / "schema-check"
GRAFANA_SCHEMA = SCHEMA_CHECK_DIR / "node_modules" / "@grafana" / "schema" / "dist" / "esm" / "raw"
GRID_COLUMNS = 24
GENERATOR = DEPLOY_DIR / "grafana" / "dashboard.py"


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return load_dashboard()


@pytest.fixture(scope="module")
def datasource_uid() -> str:
    provisioning = load_yaml(DEPLOY_DIR / "grafana/provisioning/datasources/prometheus.yml")
    [datasource] = provisioning["datasources"]
    uid: str = datasource["uid"]
    return uid


# --- Grafana's schema ------------------------------------------------------------------------


def require_schema_tools() -> Path:
    generator = SCHEMA_CHECK_DIR / "node_modules" / ".bin" / "ts-json-schema-generator"
    if generator.exists():
        require_binary("node")
        return generator
    unavailable(f"{generator.relative_to(DEPLOY_DIR.parent)} is missing (`make tools` runs npm ci)")


def generate_schema(types_file: Path, type_name: str, out: Path) -> dict[str, Any]:
    subprocess.run(
        [
            str(require_schema_tools()),
            "--path",
            str(types_file),
            "--type",
            type_name,
            "--no-type-check",
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    schema: dict[str, Any] = json.loads(out.read_text())
    return schema


def validation_errors(schema: dict[str, Any], instance: Any) -> list[str]:
    try:
        import jsonschema  # type: ignore[import-untyped]
    except ImportError:  # comes with check-jsonschema (`make tools`)
        unavailable("jsonschema is not installed (`make tools`)")
    validator = jsonschema.Draft7Validator(schema)
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in validator.iter_errors(instance)
    ]


def test_dashboard_matches_grafanas_dashboard_schema(
    dashboard: dict[str, Any], tmp_path: Path
) -> None:
    types = GRAFANA_SCHEMA / "dashboard" / "x" / "dashboard_types.gen.d.ts"
    schema = generate_schema(types, "Dashboard", tmp_path / "dashboard.json")
    assert schema["definitions"]["Dashboard"]["additionalProperties"] is False  # strict
    assert validation_errors(schema, dashboard) == []
    broken = {**dashboard, "panels": [{**dashboard["panels"][0], "gridPos": {"h": "1"}}]}
    assert validation_errors(schema, broken), "the schema accepted a malformed gridPos"


# Panel plugin -> (types file under raw/composable, whether it has a custom FieldConfig).
PANEL_TYPES = {
    "timeseries": ("timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen.d.ts", True),
    "stat": ("stat/panelcfg/x/StatPanelCfg_types.gen.d.ts", False),
    "bargauge": ("bargauge/panelcfg/x/BarGaugePanelCfg_types.gen.d.ts", False),
    "heatmap": ("heatmap/panelcfg/x/HeatmapPanelCfg_types.gen.d.ts", True),
}


def test_panel_options_match_their_plugins_schema(
    dashboard: dict[str, Any], tmp_path: Path
) -> None:
    panels = [p for p in all_panels(dashboard["panels"]) if p["type"] != "row"]
    assert {p["type"] for p in panels} <= set(PANEL_TYPES), "add the new panel type here"
    problems = []
    for panel_type, (types_file, has_field_config) in PANEL_TYPES.items():
        types = GRAFANA_SCHEMA / "composable" / types_file
        options = generate_schema(types, "Options", tmp_path / f"{panel_type}.options.json")
        custom = (
            generate_schema(types, "FieldConfig", tmp_path / f"{panel_type}.fieldconfig.json")
            if has_field_config
            else None
        )
        for panel in (p for p in panels if p["type"] == panel_type):
            where = f"panel {panel['id']} {panel['title']!r}"
            errors = validation_errors(options, panel["options"])
            problems += [f"{where} options/{e}" for e in errors]
            if custom is not None:
                defaults = panel.get("fieldConfig", {}).get("defaults", {}).get("custom", {})
                problems += [f"{where} custom/{e}" for e in validation_errors(custom, defaults)]
    assert problems == []


# --- Layout and datasources ------------------------------------------------------------------


def test_committed_json_is_the_generators_output() -> None:
    """deploy/grafana/dashboard.py generates the JSON; regenerate after changing it:
    `python deploy/grafana/dashboard.py > deploy/grafana/dashboards/pkvm-sim.json`."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("pkvm_dashboard", GENERATOR)
    assert spec is not None and spec.loader is not None
    generator = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = generator  # dataclasses look their module up there
    spec.loader.exec_module(generator)
    assert DASHBOARD_JSON.read_text() == generator.render(), "stale: rerun the generator"


def test_dashboard_identity(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "pkvm-sim"
    assert dashboard["schemaVersion"] >= 39
    assert json.loads(DASHBOARD_JSON.read_text()) == dashboard  # plain JSON, no comments


def test_panel_ids_are_unique(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in all_panels(dashboard["panels"])]
    assert len(ids) == len(set(ids))


def test_every_panel_has_a_grid_position_and_none_overlap(dashboard: dict[str, Any]) -> None:
    occupied: dict[tuple[int, int], int] = {}
    for panel in all_panels(dashboard["panels"]):
        pos = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= set(pos), panel["id"]
        assert (
            pos["w"] > 0 and pos["h"] > 0 and pos["x"] >= 0 and pos["x"] + pos["w"] <= GRID_COLUMNS
        )
        for cell in itertools.product(
            range(pos["x"], pos["x"] + pos["w"]), range(pos["y"], pos["y"] + pos["h"])
        ):
            assert cell not in occupied, f"panels {occupied[cell]} and {panel['id']} overlap"
            occupied[cell] = panel["id"]


def datasource_refs(node: Any) -> Iterator[dict[str, Any]]:
    """Every `datasource` object anywhere in the dashboard."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource" and isinstance(value, dict):
                yield value
            else:
                yield from datasource_refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from datasource_refs(item)


def test_every_query_uses_the_provisioned_datasource(
    dashboard: dict[str, Any], datasource_uid: str
) -> None:
    refs = [r for r in datasource_refs(dashboard) if r.get("type") != "grafana"]  # annotations
    assert refs
    assert {(r["type"], r["uid"]) for r in refs} == {("prometheus", datasource_uid)}
    for panel in all_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == datasource_uid, panel["id"]


def test_every_data_panel_has_queries_with_unique_ref_ids(dashboard: dict[str, Any]) -> None:
    for panel in all_panels(dashboard["panels"]):
        if panel["type"] == "row":
            continue
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert ref_ids and len(ref_ids) == len(set(ref_ids)), panel["id"]


# --- Queries -------------------------------------------------------------------------------


def test_every_query_is_valid_promql(dashboard: dict[str, Any], tmp_path: Path) -> None:
    """promtool parses each query as the expr of a recording rule."""
    exprs = [as_promql(expr) for _, expr in dashboard_exprs(dashboard)]
    result = check_as_rules(exprs, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout


def test_promtool_rejects_invalid_promql(tmp_path: Path) -> None:
    """The check above can fail: a query with a syntax error is reported."""
    result = check_as_rules(["sum by (pool) (rate(pkvm_pool_free_pages[5m])"], tmp_path)
    assert result.returncode != 0


def check_as_rules(exprs: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(json.dumps(rules, indent=2))  # JSON is YAML
    return subprocess.run(
        [require_binary("promtool"), "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_queries_use_only_catalogued_metrics_and_labels(dashboard: dict[str, Any]) -> None:
    catalog = load_metric_catalog()
    recorded = recording_rule_names()
    problems = [
        f"{where}: {problem}"
        for where, expr in dashboard_exprs(dashboard)
        for problem in catalogue_problems(as_promql(expr), catalog, recorded)
    ]
    assert problems == []


def test_the_catalogue_check_catches_unknown_names_and_labels() -> None:
    catalog = load_metric_catalog()
    problems = catalogue_problems(
        'sum by (zone) (pkvm_pool_free_page{pool="hyp"}) + pkvm_vms{pool="hyp"}'
        ' + pkvm_carveout_bytes{part="heap"}',
        catalog,
        set(),
    )
    assert problems == [
        "metric pkvm_pool_free_page is not in deploy/metrics.txt or a recording rule",
        "pkvm_vms has no label 'pool'",
        "pkvm_carveout_bytes{part} never takes the value 'heap'",
        "grouping by 'zone', which no catalogued metric has",
    ]


def test_dashboard_shows_every_catalogued_metric(dashboard: dict[str, Any]) -> None:
    used = " ".join(expr for _, expr in dashboard_exprs(dashboard))
    unused = [name for name in load_metric_catalog() if name not in used]
    assert unused == []


# --- Against a real Prometheus ---------------------------------------------------------------

# Values for labels whose catalogue entry lists none.
OPEN_LABEL_VALUES = {
    "pool": ("hyp", "host_s2"),
    "order": ("0", "1", "2", "3"),
    "method": ("AllocPages", "HostShare"),
    "code": ("OK", "RESOURCE_EXHAUSTED", "INTERNAL"),
    "op": ("alloc_pages", "host_share"),
    "version": ("0.1.0",),
    "profile": ("v5.14",),
    "page_size": ("4096",),
    "grpc_service": ("pkvm.v1.HypervisorService",),
    "grpc_method": ("AllocPages", "Execute"),
    "grpc_code": ("OK", "RESOURCE_EXHAUSTED", "INTERNAL"),
    "reason": ("ENOMEM", "QUOTA_EXCEEDED"),
}
# Consistent pool figures (free + allocated + reserved = pages), so ratios are meaningful.
POOL_PAGES = {
    "pkvm_pool_pages": 1000,
    "pkvm_pool_free_pages": 300,
    "pkvm_pool_allocated_pages": 600,
    "pkvm_pool_reserved_pages": 100,
}


class SyntheticPkvmCollector:
    """Every catalogued metric with every label combination; counters grow with time."""

    def __init__(self) -> None:
        self.catalog = load_metric_catalog()
        self.started = time.monotonic()

    def collect(self) -> Iterable[Metric]:
        elapsed = time.monotonic() - self.started
        for spec in self.catalog.values():
            help_text = spec.help
            family: GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily
            if spec.type == "histogram":
                family = HistogramMetricFamily(spec.name, help_text, labels=list(spec.labels))
            elif spec.type == "counter":
                family = CounterMetricFamily(spec.name, help_text, labels=list(spec.labels))
            else:
                family = GaugeMetricFamily(spec.name, help_text, labels=list(spec.labels))
            value_sets = [
                spec.label_values.get(label) or OPEN_LABEL_VALUES[label] for label in spec.labels
            ]
            for i, combo in enumerate(itertools.product(*value_sets)):
                if isinstance(family, HistogramMetricFamily):
                    n = (i + 1) * 10.0 * elapsed  # observations so far, half of them <= 1 ms
                    buckets = [("0.001", n / 2), ("0.01", n * 0.99), ("+Inf", n)]
                    family.add_metric(list(combo), buckets, n * 0.002)
                    continue
                if spec.type == "counter":
                    value = (i + 1) * 10.0 * elapsed
                else:
                    value = float(POOL_PAGES.get(spec.name, 4096 + i))
                family.add_metric(list(combo), value)
            yield family


@pytest.fixture(scope="module")
def prometheus_with_synthetic_metrics(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[PrometheusHandle]:
    registry = CollectorRegistry()
    registry.register(SyntheticPkvmCollector())
    port = free_loopback_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        with running_prometheus([f"127.0.0.1:{port}"], tmp_path_factory.mktemp("prom")) as prom:
            prom.wait_for_target_up(timeout=30)
            # rate() needs two samples inside its window.
            prom.wait_for_query("count_over_time(pkvm_vms[1m]) >= 3", timeout=30)
            yield prom
    finally:
        server.shutdown()
        thread.join(timeout=5)


def test_every_query_returns_data_from_a_real_prometheus(
    dashboard: dict[str, Any], prometheus_with_synthetic_metrics: PrometheusHandle
) -> None:
    """Each panel query and variable query selects real series with the catalogued labels."""
    empty = [
        f"{where}: {expr}"
        for where, expr in dashboard_exprs(dashboard)
        if not prometheus_with_synthetic_metrics.query(as_promql(expr))
    ]
    assert empty == []


def test_variable_queries_find_their_label(
    dashboard: dict[str, Any], prometheus_with_synthetic_metrics: PrometheusHandle
) -> None:
    for var in dashboard["templating"]["list"]:
        text = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        samples = prometheus_with_synthetic_metrics.query(as_promql(text))
        assert samples and all(var["name"] in s.labels for s in samples), var["name"]


def test_every_rule_returns_data_from_a_real_prometheus(
    prometheus_with_synthetic_metrics: PrometheusHandle,
) -> None:
    """The recording rules' exprs match real series (alerts are covered by promtool tests)."""
    records = recording_rule_names()
    empty = [
        name
        for name, expr in rule_exprs()
        if name in records and not prometheus_with_synthetic_metrics.query(expr)
    ]
    assert empty == []
