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
    # issue 12: build info, fragmentation, vmemmap per layout, spurious faults, refusals
    "pkvm_sim_info",
    "pkvm_pool_unusable_free_index",
    "pkvm_pool_largest_free_order",
    "pkvm_vmemmap_layout_bytes",
    "pkvm_host_s2_spurious_faults_total",
    "pkvm_host_s2_map_failures_total",
    "pkvm_grpc_refusals_total",
    # the go-grpc-prometheus names and the process collector
    "grpc_server_started_total",
    "grpc_server_handled_total",
    "grpc_server_handling_seconds",
    "process_cpu_seconds_total",
    "process_virtual_memory_bytes",
    "process_resident_memory_bytes",
    "process_start_time_seconds",
    "process_open_fds",
    "process_max_fds",
}
PREFIXES = ("pkvm_", "grpc_server_", "process_")


def test_catalogue_is_well_formed() -> None:
    catalog = load_metric_catalog()
    assert set(catalog) == REQUIRED
    for spec in catalog.values():
        assert METRIC_NAME_RE.match(spec.name) and spec.name.startswith(PREFIXES), spec.name
        assert spec.type in {"gauge", "counter", "histogram"}, spec.name
        # Counters, and only counters, end in _total (prometheus_client adds it on exposition).
        assert spec.name.endswith("_total") == (spec.type == "counter"), spec.name
        assert len(set(spec.labels)) == len(spec.labels), spec.name
        assert set(spec.label_values) <= set(spec.labels), spec.name
        assert spec.help, spec.name


def test_closed_label_sets() -> None:
    catalog = load_metric_catalog()
    assert catalog["pkvm_carveout_bytes"].label_values == {
        "part": ("vmemmap", "vm_table", "hyp", "host_s2", "host_s2_mem", "host_s2_dev",
                 "ffa_proxy", "slack")
    }
    for name in ("pkvm_host_s2_faults_total", "pkvm_host_s2_fault_failures_total"):
        assert catalog[name].label_values == {"kind": ("memory", "mmio")}
    assert catalog["pkvm_pool_free_blocks"].labels == ("pool", "order")
    assert catalog["pkvm_grpc_requests_total"].labels == ("method", "code")
    assert catalog["pkvm_vmemmap_layout_bytes"].label_values == {"layout": ("32", "8", "4", "2")}
    # go-grpc-prometheus: the histogram has no grpc_code (codes would multiply its series)
    assert catalog["grpc_server_handling_seconds"].labels == (
        "grpc_type", "grpc_service", "grpc_method"
    )
    assert catalog["grpc_server_handled_total"].labels[-1] == "grpc_code"
