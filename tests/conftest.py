"""Make the repository root importable, so tests can `import tests.<helper>` however pytest
is started (`pytest`, `python -m pytest`, any --import-mode)."""

import os
import sys
from pathlib import Path

import pytest

_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

# Under CI the property tests replay a fixed sequence of examples (reproducible runs);
# on developers' machines they explore new random examples every time.
if os.environ.get("CI"):
    from hypothesis import settings

    settings.register_profile("ci", derandomize=True, print_blob=True)
    settings.load_profile("ci")


# -- test lanes ---------------------------------------------------------------------------------
# Every test that needs something beyond the project's venv, or that runs for seconds, carries
# a marker; `make check` deselects them all (the fast lane, no system installs), `make test`
# runs everything. The markers are declared in pyproject.toml ([tool.pytest.ini_options]).
# Lanes are assigned here by node-id prefix (a file, a folder or one test), so that a new file
# in tests/kernel/ is a QEMU test without anybody remembering to say so; a test may also carry
# its marker in place (`@pytest.mark.slow`).
LANES_BY_NODE_ID: dict[str, tuple[str, ...]] = {
    # what a test drives beyond the venv
    "tests/kernel/": ("qemu",),
    "tests/tools/test_el2_initrd.py::test_init_is_a_static_arm64_executable": ("qemu",),
    "tests/deploy/test_container.py": ("podman",),
    "tests/deploy/test_container_quickstart.py": ("podman",),
    "tests/deploy/test_compose_stack.py": ("podman", "prometheus"),
    "tests/deploy/test_promtool.py": ("prometheus",),
    "tests/deploy/test_prometheus_harness.py": ("prometheus",),
    "tests/deploy/test_dashboard.py": ("prometheus", "tools"),
    "tests/deploy/test_compose.py": ("tools", "prometheus"),
    "tests/deploy/test_dockerfile.py": ("tools",),
    "tests/deploy/test_catalog.py": ("tools",),
    "tests/deploy/test_compose_sweep.py": ("tools",),
    "tests/service/test_metrics.py::test_real_prometheus_scrapes_the_service": ("prometheus",),
    "tests/service/test_metrics.py::test_promtool_check_metrics": ("prometheus",),
    "tests/tools/test_load_locust.py": ("locust",),
    "tests/interop/": ("node",),
    "tests/test_install.py": ("install",),
    # seconds of their own, even on a quiet machine
    "tests/test_lint.py": ("slow",),
    "tests/core/test_hyp_pool_properties.py": ("slow",),
    "tests/core/test_hypervisor_properties.py": ("slow",),
    "tests/core/test_refusals_at_limits.py": ("slow",),
    "tests/core/test_host_stage2.py::test_refcount_limit_of_layout_2": ("slow",),
    "tests/client/test_sdk_leases.py": ("slow",),
    "tests/service/test_soak.py": ("slow",),
    "tests/service/test_concurrency.py": ("slow",),
    "tests/service/test_fuzz_requests.py": ("slow",),
    "tests/service/test_state_serve.py": ("slow",),
    "tests/service/test_state_rpc.py::test_a_seeded_workload_split_by_a_restart": ("slow",),
    "tests/service/test_tenancy.py::test_heavy_batch_leaves_another_tenant_served": ("slow",),
    "tests/service/test_serve_flags.py::test_logs_and_sigterm_during_a_heavy_batch": ("slow",),
    "tests/service/test_metrics.py::test_series_count_at_1000_vms": ("slow",),
    "tests/service/test_metrics.py::test_every_profile_exports": ("slow",),
    "tests/service/test_leases.py::test_calls_and_renewals_keep_a_vm_alive": ("slow",),
    "tests/tools/test_scenario.py": ("slow",),
    "tests/tools/test_plots.py": ("slow",),
    "tests/tools/test_capacity.py::test_without_a_kernel_vm_table": ("slow",),
    "tests/tools/test_capacity.py::test_plot_draws_a_picture": ("slow",),
    "tests/tools/test_capacity.py::test_one_vm_costs_what_vm_lifecycle_says": ("slow",),
    "tests/tools/test_sweep.py::test_in_process_sweep_writes_rows_and_plot": ("slow",),
    "tests/tools/test_load.py::test_json_csv_and_html_reports": ("slow",),
    "tests/tools/test_load_verdict.py": ("slow",),
    "tests/service/test_serve_cli.py::test_make_serve_passes_args": ("slow",),
    "tests/tools/test_load.py::test_max_ops_bounds_each_vm": ("slow",),
    "tests/tools/test_load.py::test_progress_lines_and_terminal_progress": ("slow",),
    "tests/tools/test_load.py::test_open_loop_charges_a_stalled_server": ("slow",),
    # floods and heavy batches: their point is to load the server for seconds
    "tests/service/test_attacks.py::test_a_stream_flood_without_credentials_is_refused_by_http2":
        ("slow",),
    "tests/service/test_attacks.py::test_slowloris_connections_do_not_lock_scrapers_out":
        ("slow",),
    "tests/service/test_attacks.py::test_a_get_stats_flood_with_1000_vms_shares_snapshots":
        ("slow",),
    "tests/service/test_tenancy.py::test_stop_during_a_heavy_batch_ends_within_grace": ("slow",),
    "tests/metrics/test_http.py::test_scrapers_in_a_crowd_share_renders_and_each_gets_a_fresh_one":
        ("slow",),
    # whole load runs against a server process, or a timed rate over seconds
    "tests/tools/test_load_refused.py": ("slow",),
    "tests/tools/test_load.py::test_open_loop_holds_the_asked_rate": ("slow",),
    "tests/service/test_state_guard.py::test_the_save_fits_inside_the_grace_period": ("slow",),
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for prefix, lanes in LANES_BY_NODE_ID.items():
            if item.nodeid.startswith(prefix):
                for lane in lanes:
                    item.add_marker(getattr(pytest.mark, lane))
