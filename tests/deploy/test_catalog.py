"""deploy/metrics.txt itself: well-formed, and following Prometheus' naming rules."""

from __future__ import annotations

from tests.deploy.catalog import METRIC_NAME_RE, load_metric_catalog

# The metrics the brief for the deploy files named; the catalogue must keep all of them.
REQUIRED = {
    "pkvm_pool_pages",
    "pkvm_pool_free_pages",
    "pkvm_pool_allocated_pages",
    "pkvm_pool_reserved_pages",
    "pkvm_pool_free_blocks",
    "pkvm_pool_alloc_failures_total",
    "pkvm_vmemmap_bytes",
    "pkvm_vmemmap_bytes_per_gib",
    "pkvm_carveout_bytes",
    "pkvm_hyp_mem_pages",
    "pkvm_host_s2_mmio_recycles_total",
    "pkvm_host_s2_mmio_recycled_pages_total",
    "pkvm_host_s2_fault_failures_total",
    "pkvm_host_s2_faults_total",
    "pkvm_vms",
    "pkvm_vms_expired_total",
    "pkvm_shared_pages",
    "pkvm_refcount_limit_hits_total",
    "pkvm_grpc_requests_total",
    "pkvm_operations_total",
}


def test_catalogue_is_well_formed() -> None:
    catalog = load_metric_catalog()
    assert set(catalog) == REQUIRED
    for spec in catalog.values():
        assert METRIC_NAME_RE.match(spec.name) and spec.name.startswith("pkvm_"), spec.name
        assert spec.type in {"gauge", "counter"}, spec.name
        # Counters, and only counters, end in _total (prometheus_client adds it on exposition).
        assert spec.name.endswith("_total") == (spec.type == "counter"), spec.name
        assert len(set(spec.labels)) == len(spec.labels), spec.name
        assert set(spec.label_values) <= set(spec.labels), spec.name
        assert spec.help, spec.name


def test_closed_label_sets() -> None:
    catalog = load_metric_catalog()
    assert catalog["pkvm_carveout_bytes"].label_values == {
        "part": ("vmemmap", "hyp", "host_s2", "host_s2_mem", "host_s2_dev", "slack")
    }
    for name in ("pkvm_host_s2_faults_total", "pkvm_host_s2_fault_failures_total"):
        assert catalog[name].label_values == {"kind": ("memory", "mmio")}
    assert catalog["pkvm_pool_free_blocks"].labels == ("pool", "order")
    assert catalog["pkvm_grpc_requests_total"].labels == ("method", "code")
