"""Metrics: the names of deploy/metrics.txt, read at scrape time, seen by a real Prometheus."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
from pkvm.v1 import hypervisor_pb2 as pb2
from pkvm.v1 import hypervisor_pb2_grpc as pb2_grpc
from pkvm_sim.service.server import RunningService
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.catalog import load_metric_catalog
from tests.service.fixtures import RawVM

METRICS_LIST = Path(__file__).resolve().parents[2] / "deploy" / "metrics.txt"


def scrape(service: RunningService) -> dict[str, list[tuple[dict[str, str], float]]]:
    text = urllib.request.urlopen(f"http://{service.metrics_address}/metrics", timeout=5).read()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


@pytest.mark.skipif(not METRICS_LIST.exists(), reason="deploy/metrics.txt not written yet")
def test_exported_names_match_the_list(
    service: RunningService, stub: pb2_grpc.HypervisorServiceStub, raw_vm: RawVM
) -> None:
    stub.AllocPages(pb2.AllocPagesRequest(handle=raw_vm.handle, order=0), metadata=raw_vm.md)
    samples = scrape(service)
    catalog = load_metric_catalog(METRICS_LIST)
    exported = {name for name in samples if not name.endswith("_created")}
    assert exported == set(catalog)
    for name, spec in catalog.items():
        for labels, _ in samples[name]:
            assert sorted(labels) == sorted(spec.labels), name
            for label, allowed in spec.label_values.items():
                assert labels[label] in allowed, f"{name}{{{label}={labels[label]!r}}}"


def test_values_follow_the_state(service: RunningService, stub: pb2_grpc.HypervisorServiceStub,
                                 raw_vm: RawVM) -> None:
    stub.AllocPages(pb2.AllocPagesRequest(handle=raw_vm.handle, order=1), metadata=raw_vm.md)
    stats = stub.GetStats(pb2.GetStatsRequest())
    samples = scrape(service)
    free = {labels["pool"]: value for labels, value in samples["pkvm_pool_free_pages"]}
    for pool in stats.pools:
        assert free[pool.name] == pool.free_pages
    assert samples["pkvm_vms"][0][1] == stats.nr_vms
    assert samples["pkvm_hyp_mem_pages"][0][1] == 5164
    requests = {(lab["method"], lab["code"]): v for lab, v in samples["pkvm_grpc_requests_total"]}
    assert requests[("AllocPages", "OK")] >= 1
    ops = {lab["op"]: v for lab, v in samples["pkvm_operations_total"]}
    assert ops["alloc_pages"] >= 1 and ops["create_vm"] >= 1


def test_real_prometheus_scrapes_the_service(tmp_path: Path) -> None:
    from pkvm_sim.service.server import ServerSettings

    from tests.prometheus_harness import free_loopback_port, running_prometheus
    from tests.service.fixtures import start_service

    port = free_loopback_port()
    service = start_service(settings=ServerSettings(
        listen="127.0.0.1:0", metrics_listen=f"127.0.0.1:{port}", workers=4))
    try:
        stub = pb2_grpc.HypervisorServiceStub(__import__("grpc").insecure_channel(service.target))
        vm = RawVM(stub)
        stub.AllocPages(pb2.AllocPagesRequest(handle=vm.handle, order=3), metadata=vm.md)
        expected = next(
            p.free_pages for p in stub.GetStats(pb2.GetStatsRequest()).pools if p.name == "hyp"
        )
        with running_prometheus([f"127.0.0.1:{port}"], tmp_path) as prom:
            prom.wait_for_target_up(timeout=30)
            [sample] = prom.wait_for_query(
                'pkvm_pool_free_pages{job="pkvm-sim",pool="hyp"}', timeout=20
            )
            assert sample.value == expected
    finally:
        service.stop(0)


def test_fatal_fault_counted_by_kind(service: RunningService,
                                     stub: pb2_grpc.HypervisorServiceStub) -> None:
    def failures() -> dict[str, float]:
        samples = scrape(service)["pkvm_host_s2_fault_failures_total"]
        return {labels["kind"]: value for labels, value in samples}

    before = failures()
    carveout = stub.Reserve(pb2.ReserveRequest()).carveout_base
    fault = stub.HostFault(pb2.HostFaultRequest(addr=carveout)).fault
    assert fault.outcome == pb2.FAULT_OUTCOME_FATAL
    after = failures()
    assert after["memory"] == before["memory"] + 1 and after["mmio"] == before["mmio"]
