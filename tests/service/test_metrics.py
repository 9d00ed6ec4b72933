"""Metrics: the names of deploy/metrics.txt, read at scrape time, seen by a real Prometheus."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from pkvm.v1 import hypervisor_pb2 as pb2
from pkvm.v1 import hypervisor_pb2_grpc as pb2_grpc
from pkvm_sim.service.server import RunningService
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.catalog import load_metric_catalog, series_catalog
from tests.service.fixtures import RawVM
from tests.waiting import wait_for

METRICS_LIST = Path(__file__).resolve().parents[2] / "deploy" / "metrics.txt"


def scrape(service: RunningService) -> dict[str, list[tuple[dict[str, str], float]]]:
    text = urllib.request.urlopen(f"http://{service.metrics_address}/metrics", timeout=60).read()
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
    with pytest.raises(grpc.RpcError):  # a refusal: pkvm_grpc_refusals_total gets a sample
        stub.AllocPages(pb2.AllocPagesRequest(handle=raw_vm.handle, order=99), metadata=raw_vm.md)
    # The server counts a call when its handler has ended, which may be after the client
    # has the answer, and /metrics may serve a render made just before: wait for the sample.
    latest: dict[str, dict[str, list[tuple[dict[str, str], float]]]] = {}

    def refusal_counted() -> bool:
        latest["samples"] = scrape(service)
        return "pkvm_grpc_refusals_total" in latest["samples"]

    assert wait_for(refusal_counted, seconds=60)
    samples = latest["samples"]
    series = series_catalog(load_metric_catalog(METRICS_LIST))
    exported = {name for name in samples if not name.endswith("_created")}
    assert exported == set(series)
    for name, (spec, label_names) in series.items():
        for labels, _ in samples[name]:
            assert sorted(labels) == sorted(label_names), name
            for label, allowed in spec.label_values.items():
                assert labels[label] in allowed, f"{name}{{{label}={labels[label]!r}}}"


def test_values_follow_the_state(service: RunningService, stub: pb2_grpc.HypervisorServiceStub,
                                 raw_vm: RawVM) -> None:
    stub.AllocPages(pb2.AllocPagesRequest(handle=raw_vm.handle, order=1), metadata=raw_vm.md)
    stats = stub.GetStats(pb2.GetStatsRequest())
    samples = scrape(service)
    free = {labels["pool"]: value for labels, value in samples["pkvm_pool_free_pages"]}
    host_pools = [pool for pool in stats.pools if not pool.name.startswith("vm/")]
    assert set(free) == {pool.name for pool in host_pools}  # per-VM pools are opt-in
    for pool in host_pools:
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
            # The interceptor's series, as go-grpc-prometheus dashboards query them.
            [handled_ok] = prom.wait_for_query(
                'grpc_server_handled_total{job="pkvm-sim",grpc_method="AllocPages",'
                'grpc_code="OK"}', timeout=20)
            assert handled_ok.value == 1
            [info] = prom.wait_for_query('pkvm_sim_info{job="pkvm-sim"}', timeout=20)
            assert info.labels["layout"] == "4"
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


# --- issue 12: what the new series say ------------------------------------------------------


def test_info_names_the_configuration(service: RunningService) -> None:
    [(labels, value)] = scrape(service)["pkvm_sim_info"]
    # SimConfig() is v5.14 with 4 KiB pages: the 4-byte hyp_page (the series' point).
    assert value == 1
    assert (labels["profile"], labels["layout"], labels["page_size"]) == ("v5.14", "4", "4096")
    assert labels["coverage"] == "all" and labels["version"]
    assert labels["core"] in ("compiled", "pure")


def test_vmemmap_per_layout_follows_the_entry_size(service: RunningService) -> None:
    samples = scrape(service)
    by_layout = {labels["layout"]: v for labels, v in samples["pkvm_vmemmap_layout_bytes"]}
    # 4 GiB covered = 1 Mi pages of 4 KiB: 32, 8, 4 and 2 bytes each (the cover letter's
    # "8 MiB to 1 MiB of vmemmap per GiB", times 4 GiB; 8 bytes is v6.18's struct hyp_page).
    assert by_layout == {"32": 32 * 2**20, "8": 8 * 2**20, "4": 4 * 2**20, "2": 2 * 2**20}
    assert samples["pkvm_vmemmap_bytes"][0][1] == by_layout["4"]  # the running layout


def test_fragmentation_series_match_the_free_blocks(service: RunningService) -> None:
    samples = scrape(service)
    blocks: dict[str, dict[int, float]] = {}
    for labels, v in samples["pkvm_pool_free_blocks"]:
        blocks.setdefault(labels["pool"], {})[int(labels["order"])] = v
    largest = {labels["pool"]: v for labels, v in samples["pkvm_pool_largest_free_order"]}
    unusable = {(lab["pool"], int(lab["order"])): v
                for lab, v in samples["pkvm_pool_unusable_free_index"]}
    for pool, counts in blocks.items():
        top = max((o for o, n in counts.items() if n), default=-1)
        assert largest[pool] == top
        assert unusable[(pool, 0)] == 0.0  # every free page serves an order-0 request
        if top >= 0:  # no block above the largest order: all free space unusable there
            assert unusable.get((pool, top + 1), 1.0) == 1.0


def test_refusals_are_counted_by_reason(service: RunningService,
                                        stub: pb2_grpc.HypervisorServiceStub,
                                        raw_vm: RawVM) -> None:
    def refusals() -> dict[tuple[str, str, str], float]:
        return {(lab["grpc_method"], lab["grpc_code"], lab["reason"]): v
                for lab, v in scrape(service).get("pkvm_grpc_refusals_total", [])}

    before = refusals()
    with pytest.raises(grpc.RpcError) as refused:
        stub.PutPage(pb2.PutPageRequest(handle=raw_vm.handle, pfn=1 << 40), metadata=raw_vm.md)
    code = refused.value.code().name
    # The server counts the call once its status is sent, so the client may scrape first.
    deadline = time.monotonic() + 30
    while True:
        after = refusals()
        grown = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
        if grown or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    [(method, got_code, reason)] = grown
    assert (method, got_code) == ("PutPage", code) and reason


def handled(service: RunningService) -> dict[tuple[str, str, str], float]:
    return {(lab["grpc_type"], lab["grpc_method"], lab["grpc_code"]): v
            for lab, v in scrape(service)["grpc_server_handled_total"]}


def test_interceptor_counts_unary_calls_by_code(service: RunningService,
                                                stub: pb2_grpc.HypervisorServiceStub,
                                                raw_vm: RawVM) -> None:
    before = handled(service)
    stub.AllocPages(pb2.AllocPagesRequest(handle=raw_vm.handle, order=0), metadata=raw_vm.md)
    with pytest.raises(grpc.RpcError) as refused:
        stub.AllocPages(pb2.AllocPagesRequest(handle=raw_vm.handle, order=0))  # no token
    ok = ("unary", "AllocPages", "OK")
    denied = ("unary", "AllocPages", refused.value.code().name)
    deadline = time.monotonic() + 30  # counted once the status is sent: wait for it
    while (after := handled(service)).get(denied, 0) == before.get(denied, 0) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert after[ok] - before.get(ok, 0) == 1
    assert after[denied] - before.get(denied, 0) == 1
    samples = scrape(service)
    started = {lab["grpc_method"]: v for lab, v in samples["grpc_server_started_total"]}
    done = sum(v for (_, m, _), v in handled(service).items() if m == "AllocPages")
    assert started["AllocPages"] == done  # nothing in flight
    buckets = [(float(lab["le"]), v) for lab, v in samples["grpc_server_handling_seconds_bucket"]
               if lab["grpc_method"] == "AllocPages"]
    assert buckets == sorted(buckets)  # cumulative
    assert buckets[-1] == (float("inf"), done)


def test_an_undecodable_unary_body_is_counted_with_its_reason(
    service: RunningService, channel: grpc.Channel
) -> None:
    """The unary handler counts its own calls (metrics/rpc.py, `counts_itself`): a body that
    is no AllocPagesRequest is refused before any other step, and still counted once, as
    started and as handled, with its code and reason."""
    def figures() -> tuple[float, float, float]:
        samples = scrape(service)
        started = sum(v for lab, v in samples["grpc_server_started_total"]
                      if lab["grpc_method"] == "AllocPages")
        refused = sum(v for lab, v in samples["grpc_server_handled_total"]
                      if lab["grpc_method"] == "AllocPages"
                      and lab["grpc_code"] == "INVALID_ARGUMENT")
        reasons = sum(v for lab, v in samples.get("pkvm_grpc_refusals_total", [])
                      if (lab["grpc_method"], lab["grpc_code"], lab["reason"])
                      == ("AllocPages", "INVALID_ARGUMENT", "UNDECODABLE_REQUEST"))
        return started, refused, reasons

    started, refused, reasons = figures()
    raw = channel.unary_unary("/pkvm.v1.HypervisorService/AllocPages")
    with pytest.raises(grpc.RpcError) as caught:
        raw(b"\xff\xff\xff", timeout=60)  # a truncated varint: not a message
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert wait_for(lambda: figures()[1] == refused + 1, seconds=60)
    assert figures() == (started + 1, refused + 1, reasons + 1)


def test_interceptor_counts_a_bidi_stream_once(service: RunningService,
                                               stub: pb2_grpc.HypervisorServiceStub,
                                               raw_vm: RawVM) -> None:
    before = handled(service)
    batch = pb2.ExecuteRequest(handle=raw_vm.handle, ops=[pb2.BATCH_OP_ALLOC_PAGES], arg0=[0],
                               arg1=[0])
    [answer] = list(stub.Execute(iter([batch]), metadata=raw_vm.md))
    assert answer.batch_id == 0
    after = handled(service)
    key = ("bidi_stream", "Execute", "OK")
    assert after[key] - before.get(key, 0) == 1


def series_count(service: RunningService) -> int:
    return sum(len(v) for v in scrape(service).values())


@pytest.mark.parametrize("per_vm", [False, True], ids=["default", "per-vm"])
def test_series_count_at_1000_vms(per_vm: bool) -> None:
    """Issue 7: by default the series count does not grow with VMs; --metrics-per-vm opts in."""
    from pkvm_sim.service.server import ServerSettings

    from tests.service.fixtures import start_service

    service = start_service(settings=ServerSettings(
        listen="127.0.0.1:0", metrics_listen="127.0.0.1:0", workers=4, metrics_per_vm=per_vm))
    try:
        with grpc.insecure_channel(service.target) as channel:
            stub = pb2_grpc.HypervisorServiceStub(channel)
            RawVM(stub, slice_pages=1)
            stub.GetStats(pb2.GetStatsRequest())  # every method called below has series
            with_one = series_count(service)
            for _ in range(999):
                RawVM(stub, slice_pages=1)
            assert stub.GetStats(pb2.GetStatsRequest()).nr_vms == 1000
            with_1000 = series_count(service)
            pools = {lab["pool"] for lab, _ in scrape(service)["pkvm_pool_pages"]}
    finally:
        service.stop(0)
    if per_vm:
        assert len(pools) == 2 + 1000
        assert with_1000 > with_one + 999 * 5
    else:
        assert pools == {"hyp", "host_s2"}
        assert with_1000 == with_one


def test_promtool_check_metrics_is_clean_on_a_real_scrape(
    service: RunningService, stub: pb2_grpc.HypervisorServiceStub, raw_vm: RawVM
) -> None:
    import subprocess

    from tests.prometheus_harness import require_binary

    stub.AllocPages(pb2.AllocPagesRequest(handle=raw_vm.handle, order=0), metadata=raw_vm.md)
    text = urllib.request.urlopen(f"http://{service.metrics_address}/metrics", timeout=5).read()
    assert b"grpc_server_handling_seconds_bucket" in text and b"process_cpu_seconds_total" in text
    result = subprocess.run([require_binary("promtool"), "check", "metrics"], input=text,
                            capture_output=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == b""  # no lint warning either


def test_metrics_per_vm_is_a_serve_knob(tmp_path: Path) -> None:
    """Flag, environment and [server] table, like every other serve setting; off by default."""
    import argparse

    from pkvm_sim.service import serve

    def settings(*argv: str, environ: dict[str, str] | None = None) -> bool:
        parser = argparse.ArgumentParser()
        serve.add_arguments(parser)
        _, server = serve.resolve(parser.parse_args(list(argv)), environ=environ or {})
        return bool(serve.settings_from(server).metrics_per_vm)

    assert settings() is False
    assert settings("--metrics-per-vm", "true") is True
    assert settings("--metrics-per-vm", "off") is False
    assert settings(environ={"PKVM_SIM_METRICS_PER_VM": "true"}) is True
    assert settings(environ={"PKVM_SIM_METRICS_PER_VM": "0"}) is False
    path = tmp_path / "pkvm.toml"
    path.write_text("[server]\nmetrics_per_vm = true\n")
    assert settings("--config", str(path)) is True
    with pytest.raises(ValueError):
        settings(environ={"PKVM_SIM_METRICS_PER_VM": "maybe"})


def test_every_profile_exports_catalogued_carveout_parts() -> None:
    """v6.x profiles add carve-out parts (VM table, FF-A proxy): the catalogue lists them, and
    the parts add up to the whole carve-out."""
    from pkvm_sim.core.config import SimConfig
    from pkvm_sim.core.profiles import profile_names
    from pkvm_sim.service.server import ServerSettings

    from tests.service.fixtures import start_service

    allowed = load_metric_catalog(METRICS_LIST)["pkvm_carveout_bytes"].label_values["part"]
    for profile in profile_names():
        service = start_service(
            SimConfig.from_mapping({"profile": profile}),
            ServerSettings(listen="127.0.0.1:0", metrics_listen="127.0.0.1:0", workers=2))
        try:
            with grpc.insecure_channel(service.target) as channel:
                reserved = pb2_grpc.HypervisorServiceStub(channel).Reserve(
                    pb2.ReserveRequest()).reserved_bytes
            parts = {lab["part"]: v for lab, v in scrape(service)["pkvm_carveout_bytes"]}
        finally:
            service.stop(0)
        assert set(parts) <= set(allowed), profile
        assert sum(parts.values()) == reserved, profile
