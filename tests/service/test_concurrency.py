"""Many concurrent clients, legal and hostile, against the real service over real sockets.

The standard: no request, however malformed or concurrent, may crash the server, leak a page
or corrupt a free list; no request may observe a half-done operation. So while client
threads hammer the service, a checker thread repeatedly takes the simulator lock (as every
request does) and runs the whole-machine audit; afterwards, with every VM destroyed, the
machine must equal its state right after boot.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import pkvm_client
import pytest
from pkvm_client import Batch, PkvmError, TransportError
from pkvm_sim.core.config import SimConfig
from pkvm_sim.core.hypervisor import Hypervisor
from pkvm_sim.service.server import ServerSettings, start

NR_CLIENTS = 10
STEPS_PER_CLIENT = 300
U64 = (1 << 64) - 1


def hostile_or_legal_step(
    vm: pkvm_client.VM, other: pkvm_client.VM, rnd: random.Random, held: list[int],
    shared: set[int],
) -> str:
    """One random operation; returns its name. Typed refusals are the caller's business."""
    slice_pfn = vm.info.slice_base_pfn + rnd.randrange(vm.info.slice_nr_pages)
    roll = rnd.randrange(16)
    if roll < 4:
        held.append(vm.alloc_pages(rnd.choice((0, 0, 1, 2, 5, 11, 12, -1, 2**31 - 1))))
        return "alloc"
    if roll < 6 and held:
        pfn = held.pop(rnd.randrange(len(held)))
        vm.put_page(pfn)
        return "put"
    if roll == 6 and held:
        pfn = rnd.choice(held)
        vm.get_page(pfn)
        vm.put_page(pfn)
        return "getput"
    if roll == 7:
        target = rnd.choice((slice_pfn, slice_pfn, rnd.randrange(U64), 0))
        nr = rnd.choice((1, 1, 2, 0, 2**32 - 1))
        if target in shared:
            vm.host_unshare(target, 1)
            shared.discard(target)
        else:
            vm.host_share(target, nr)
            if nr == 1:
                shared.add(target)
        return "share"
    if roll == 8:
        vm.guest_map(rnd.randrange(1 << 30) & ~0xFFF, slice_pfn)
        return "guest_map"
    if roll == 9:
        vm.topup_memcache(rnd.choice((1, 4, 0, 2**31)))
        return "topup"
    if roll == 10:
        vm.map_mmio(rnd.choice((0x0900_0000, rnd.randrange(1 << 40), 0x8000_1000, U64)))
        return "mmio"
    if roll == 11:
        vm.host_fault(rnd.choice((0x8000_0000 + rnd.randrange(1 << 32), U64, 0x1_7EA0_0000)))
        return "host_fault"
    if roll == 12 and other.destroyed is False:
        # Another VM's blocks and slice: must be refused, never executed.
        victim = other.info.slice_base_pfn
        rnd.choice((vm.put_page, vm.get_page))(victim)
        return "foreign"
    if roll == 13:
        batch = Batch()
        for _ in range(rnd.randrange(1, 40)):
            batch.alloc_pages(rnd.choice((0, 1, 30)))
        result = vm.execute(batch)
        held.extend(v for v in result if isinstance(v, int))
        return "batch"
    if roll == 14:
        forged = pkvm_client.VM(vm.hypervisor, other.info, token="forged")
        forged.alloc_pages(0)
        return "forged_token"
    vm.put_page(rnd.randrange(U64))
    return "random_put"


def client(target: str, seed: int, outcomes: Counter[str], failures: list[str],
           barrier: threading.Barrier) -> None:
    rnd = random.Random(seed)
    with pkvm_client.Hypervisor(target) as hv:
        vm = hv.create_vm(nr_vcpus=1, slice_pages=32)
        other = hv.create_vm(nr_vcpus=1, slice_pages=8)
        held: list[int] = []
        shared: set[int] = set()
        barrier.wait()
        for _ in range(STEPS_PER_CLIENT):
            try:
                outcomes[hostile_or_legal_step(vm, other, rnd, held, shared)] += 1
            except TransportError as error:  # INTERNAL, UNKNOWN, UNAVAILABLE: a server bug
                failures.append(f"seed {seed}: {error!r}")
                return
            except PkvmError as error:
                outcomes[type(error).__name__] += 1
        if seed % 2 == 0:  # give everything back; odd seeds let destroy reclaim it all
            for pfn in held:
                vm.put_page(pfn)
            for pfn in shared:
                vm.host_unshare(pfn)
        vm.destroy()
        other.destroy()


@pytest.mark.timeout(240)
def test_concurrent_hostile_clients_leave_no_trace() -> None:
    hv = Hypervisor.boot(SimConfig())
    boot_dump = hv.canonical_dump()
    hyp_free_at_boot = hv.hyp_pool.free_pages
    service = start(SimConfig(), ServerSettings(listen="127.0.0.1:0", metrics_listen=None,
                                                workers=NR_CLIENTS + 4), hypervisor=hv)
    lock = service.servicer.lock
    outcomes: Counter[str] = Counter()
    failures: list[str] = []
    audits = 0
    done = threading.Event()

    def checker() -> None:
        nonlocal audits
        while not done.is_set():
            with lock:  # between two requests: no half-done operation may be visible
                try:
                    hv.audit()
                except AssertionError as error:
                    failures.append(f"audit between requests: {error}")
                    return
            audits += 1
            time.sleep(0.02)

    barrier = threading.Barrier(NR_CLIENTS)
    threads: list[threading.Thread] = [
        threading.Thread(target=client, args=(service.target, seed, outcomes, failures, barrier))
        for seed in range(NR_CLIENTS)
    ]
    audit_thread = threading.Thread(target=checker)
    try:
        audit_thread.start()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        done.set()
        audit_thread.join()
        service.stop(0)
    assert not failures, failures
    assert audits > 3
    # Every kind of operation ran, and hostile ones were refused with typed errors.
    for name in ("alloc", "put", "share", "guest_map", "batch", "mmio"):
        assert outcomes[name] > 0, outcomes
    for refusal in ("PermissionDeniedError", "InvalidArgumentError", "AuthenticationError"):
        assert outcomes[refusal] > 0, outcomes
    hv.audit()
    assert hv.hyp_pool.free_pages == hyp_free_at_boot
    assert hv.canonical_dump() == boot_dump
