"""The metric catalogue (deploy/metrics.txt) and the deploy files' PromQL, for the tests.

deploy/metrics.txt is the one list of what pkvm-sim exports. The rules and dashboard tests
check every `pkvm_*` name and label their PromQL uses against it; the metrics module's tests
can check the real exposition against it with `load_metric_catalog()`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.unavailable import unavailable

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY_DIR = REPO_ROOT / "deploy"
METRICS_TXT = DEPLOY_DIR / "metrics.txt"
RULES_YML = DEPLOY_DIR / "prometheus" / "rules.yml"
DASHBOARD_JSON = DEPLOY_DIR / "grafana" / "dashboards" / "pkvm-sim.json"

# Labels Prometheus itself attaches to every scraped series.
TARGET_LABELS = frozenset({"job", "instance"})
# Series Prometheus makes itself that the deploy files may use.
PROMETHEUS_SERIES = frozenset({"up"})

METRIC_NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
# Names the deploy files may only use when catalogued (or recorded): ours, the interceptor's
# go-grpc-prometheus series and the process collector's.
_PKVM_NAME_RE = re.compile(
    r"(?<![A-Za-z0-9_:])((?:pkvm[_:]|grpc_server_|process_)[A-Za-z0-9_:]*)"
)
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
_SELECTOR_RE = re.compile(r"(?<![A-Za-z0-9_:])([a-zA-Z_:][A-Za-z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER_LABEL_RE = re.compile(r"([a-zA-Z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING_RE = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


@dataclass(frozen=True)
class MetricSpec:
    """One line of deploy/metrics.txt."""

    name: str
    type: str  # "gauge" | "counter" | "histogram"
    labels: tuple[str, ...]
    help: str
    # For labels whose values are a closed set (`part=vmemmap|hyp|...`): those values.
    label_values: dict[str, tuple[str, ...]] = field(default_factory=dict)


def load_metric_catalog(path: Path = METRICS_TXT) -> dict[str, MetricSpec]:
    """Parse deploy/metrics.txt into {name: MetricSpec}, in file order."""
    catalog: dict[str, MetricSpec] = {}
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split(maxsplit=3)
        if len(parts) < 4:
            raise ValueError(f"{path}:{lineno}: want 'name type labels help', got {raw!r}")
        name, kind, label_col, help_text = parts
        labels: list[str] = []
        values: dict[str, tuple[str, ...]] = {}
        if label_col != "-":
            for item in label_col.split(","):
                label, _, allowed = item.partition("=")
                labels.append(label)
                if allowed:
                    values[label] = tuple(allowed.split("|"))
        if name in catalog:
            raise ValueError(f"{path}:{lineno}: {name} listed twice")
        catalog[name] = MetricSpec(name, kind, tuple(labels), help_text, values)
    return catalog


def exposed_names(spec: MetricSpec) -> dict[str, tuple[str, ...]]:
    """The sample names a metric appears under in the exposition, with their labels."""
    if spec.type != "histogram":
        return {spec.name: spec.labels}
    return {
        f"{spec.name}_bucket": (*spec.labels, "le"),
        f"{spec.name}_sum": spec.labels,
        f"{spec.name}_count": spec.labels,
    }


def series_catalog(catalog: dict[str, MetricSpec]) -> dict[str, tuple[MetricSpec, tuple[str, ...]]]:
    """Every exposed sample name -> (its catalogue entry, its labels)."""
    return {
        name: (spec, labels)
        for spec in catalog.values()
        for name, labels in exposed_names(spec).items()
    }


def load_yaml(path: Path) -> Any:
    """Parse a YAML file (ruamel.yaml comes with check-jsonschema, installed by `make tools`)."""
    try:
        from ruamel.yaml import YAML
    except ImportError:
        unavailable("ruamel.yaml is not installed (`make tools` installs check-jsonschema with it)")
    return YAML(typ="safe", pure=True).load(path)


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD_JSON.read_text())
    return dashboard


def all_panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    out: list[dict[str, Any]] = []
    for panel in panels:
        out.append(panel)
        out.extend(all_panels(panel.get("panels", [])))
    return out


def dashboard_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable of the dashboard."""
    exprs = [
        (f"panel {p['id']} {p.get('title', '')!r} target {t.get('refId')}", t["expr"])
        for p in all_panels(dashboard["panels"])
        for t in p.get("targets", [])
        if "expr" in t
    ]
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]
            text = query["query"] if isinstance(query, dict) else query
            exprs.append((f"variable {var['name']}", text))
    return exprs


def rule_exprs(rules_path: Path = RULES_YML) -> list[tuple[str, str]]:
    """(rule name, PromQL) for every recording rule and alert of a rules file."""
    doc = load_yaml(rules_path)
    return [
        (rule.get("record") or rule["alert"], rule["expr"])
        for group in doc["groups"]
        for rule in group["rules"]
    ]


def recording_rule_names(rules_path: Path = RULES_YML) -> set[str]:
    doc = load_yaml(rules_path)
    return {r["record"] for g in doc["groups"] for r in g["rules"] if "record" in r}


# Grafana's variables, replaced so that the text is plain PromQL (`.*` selects every value).
GRAFANA_SUBSTITUTIONS = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "5m",
    "$instance": ".*",
    "$pool": ".*",
}


def as_promql(text: str) -> str:
    """Dashboard query text as plain PromQL.

    `label_values(selector, label)` (a Grafana variable query, not PromQL) becomes `selector`.
    """
    for var, value in GRAFANA_SUBSTITUTIONS.items():
        text = text.replace(var, value)
    if "$" in text:
        raise ValueError(f"unknown Grafana variable in {text!r}")
    m = re.fullmatch(r"\s*label_values\((.*),\s*([a-zA-Z_][A-Za-z0-9_]*)\s*\)\s*", text, re.S)
    return m.group(1) if m else text


def catalogue_problems(expr: str, catalog: dict[str, MetricSpec], recorded: set[str]) -> list[str]:
    """What in `expr` is not in the catalogue: unknown pkvm names, unknown labels."""
    problems = []
    series = series_catalog(catalog)
    known_names = set(series) | recorded
    for name in _PKVM_NAME_RE.findall(expr):
        if name not in known_names:
            problems.append(f"metric {name} is not in deploy/metrics.txt or a recording rule")
    all_labels = set(TARGET_LABELS).union(*(labels for _, labels in series.values()))
    for name, matchers in _SELECTOR_RE.findall(expr):
        allowed = set(TARGET_LABELS)
        if name in series:
            allowed |= set(series[name][1])
        elif name in recorded or name in PROMETHEUS_SERIES:
            allowed = all_labels
        else:
            continue  # a function call's braces can't occur; anything else was reported above
        for label in _MATCHER_LABEL_RE.findall(matchers):
            if label not in allowed:
                problems.append(f"{name} has no label {label!r}")
            spec = series[name][0] if name in series else None
            if spec and label in spec.label_values:
                for value in re.findall(rf'\b{label}\s*=\s*"([^"]*)"', matchers):
                    if value not in spec.label_values[label]:
                        problems.append(f"{name}{{{label}}} never takes the value {value!r}")
    for group in _GROUPING_RE.findall(expr):
        for label in filter(None, (x.strip() for x in group.split(","))):
            if label not in all_labels:
                problems.append(f"grouping by {label!r}, which no catalogued metric has")
    return problems
