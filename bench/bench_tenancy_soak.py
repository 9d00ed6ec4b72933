"""Soak: 256 VMs doing mixed operations with create and destroy, client processes SIGKILLed
at random, then: GetStats equals the post-boot figures and the server's RSS stayed flat.

    python bench/bench_tenancy_soak.py [--seconds 120] [--vms 256] [--workers 4]

The server is `pkvm-sim serve` in its own process with short leases (a killed client's VMs
are reaped, as docs/service.md (Sessions and leases) asks of a session that ends).
Client processes (the SDK) each
drive their share of the VMs: allocs and puts (unary and Execute), share/unshare, memcache
top-ups and guest maps, MMIO faults, and destroy + create. Every `--kill-every` seconds one
random client is SIGKILLed and replaced. At the end every client is killed, the leases run
out, and the post-teardown GetStats must equal the post-boot one, host stage-2 tables aside
(MMIO faults build them, and they are recycled, not torn down: docs/service.md). RSS is
sampled every second; the figure is its growth over the second half of the run.

tests/service/test_soak.py runs a short version of this in the suite.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
READY = re.compile(r"listening on \S+?:(\d+)")
LEASE_SECONDS = 2.0
MMIO_BASE = 0x1000_0000  # below the quick-start RAM: device memory


def worker(target: str, nr_vms: int, seed: int) -> None:
    """One client process: drives its VMs until it is killed."""
    from pkvm_client import Batch, Hypervisor, NotFoundError, PkvmError

    rng = random.Random(seed)
    hv = Hypervisor(target, timeout=30)
    vms: list[Any] = []
    held: dict[int, list[int]] = {}  # id(vm) -> pfns (handles are reused by the server)

    def create() -> None:
        vm = hv.create_vm(slice_pages=rng.choice((16, 64, 256)), lease_seconds=LEASE_SECONDS,
                          name=f"soak-{seed}-{rng.randrange(1 << 20)}")
        vms.append(vm)
        held[id(vm)] = []

    for _ in range(nr_vms):
        create()
    while True:
        vm = rng.choice(vms)
        pfns = held[id(vm)]
        roll = rng.random()
        try:
            if roll < 0.3:
                pfns.append(vm.alloc_pages(order=rng.randint(0, 2)))
            elif roll < 0.55 and pfns:
                vm.put_page(pfns.pop(rng.randrange(len(pfns))))
            elif roll < 0.7:
                batch = Batch()
                for _ in range(rng.randint(1, 64)):
                    batch.alloc_pages()
                result = vm.execute(batch)
                puts = Batch()
                for value in result:
                    if isinstance(value, int):
                        puts.put_page(value)
                if len(puts):
                    vm.execute(puts)
            elif roll < 0.8:
                base = vm.info.slice_base_pfn
                nr = rng.randint(1, min(8, vm.info.slice_nr_pages))
                vm.host_share(base, nr)
                vm.host_unshare(base, nr)
            elif roll < 0.88:
                vm.topup_memcache(rng.randint(1, 4))
                page = rng.randrange(vm.info.slice_nr_pages)
                vm.guest_map(page * 4096, vm.info.slice_base_pfn + page)
            elif roll < 0.92:
                hv.map_mmio(MMIO_BASE + rng.randrange(1 << 16) * 4096)
            else:
                vms.remove(vm)
                del held[id(vm)]
                vm.destroy()
                create()
        except NotFoundError:  # reaped: the machine is slow and its lease ran out
            if vm in vms:
                vms.remove(vm)
                del held[id(vm)]
            with contextlib.suppress(PkvmError):
                create()
        except PkvmError:
            pass  # quotas, an exhausted pool, a guest IPA mapped twice: all expected


@dataclass
class SoakResult:
    post_boot: dict[str, Any]
    after: dict[str, Any]
    rss_mib: list[float] = field(default_factory=list)
    kills: int = 0
    seconds: float = 0.0
    peak_vms: int = 0  # sampled every second: the load really ran
    peak_hyp_allocated: int = 0
    peak_shared: int = 0

    @property
    def rss_growth_second_half(self) -> float:
        """RSS at the end over RSS at the midpoint, minus 1."""
        half = self.rss_mib[len(self.rss_mib) // 2]
        return self.rss_mib[-1] / half - 1


def comparable(stats: Any) -> dict[str, Any]:
    """GetStats without the host stage-2 tables (faults build them; they stay, recycled)."""
    pools = {p.name: (p.nr_pages, p.free_pages, p.allocated_pages, tuple(p.free_blocks_per_order))
             for p in stats.pools if not p.name.startswith("host_s2")}
    return {"pools": pools, "nr_vms": stats.nr_vms, "shared_pages": stats.shared_pages,
            "vmemmap": str(stats.vmemmap)}


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def soak(seconds: float, nr_vms: int, nr_workers: int, kill_every: float,
         seed: int = 1) -> SoakResult:
    from pkvm_client import Hypervisor

    rng = random.Random(seed)
    server = subprocess.Popen(
        [sys.executable, "-m", "pkvm_sim.cli", "serve", "--listen", "127.0.0.1:0",
         "--metrics-listen", "off", "--log-level", "WARNING",
         "--vm-lease-seconds", str(LEASE_SECONDS), "--max-vms", str(2 * nr_vms)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert server.stdout is not None
    match = READY.search(server.stdout.readline())
    assert match, "the server did not start"
    target = f"127.0.0.1:{match.group(1)}"
    spawn = multiprocessing.get_context("spawn")
    workers: list[Any] = []
    try:
        with Hypervisor(target) as hv:
            post_boot = hv.stats()
            per_worker = nr_vms // nr_workers

            def start_worker() -> Any:
                process = spawn.Process(target=worker,
                                        args=(target, per_worker, rng.randrange(1 << 30)))
                process.start()
                return process

            workers = [start_worker() for _ in range(nr_workers)]
            result = SoakResult(comparable(post_boot), {})
            start = time.monotonic()
            next_kill = start + kill_every
            while time.monotonic() - start < seconds:
                time.sleep(1.0)
                result.rss_mib.append(rss_mib(server.pid))
                now = hv.stats()
                result.peak_vms = max(result.peak_vms, now.nr_vms)
                result.peak_shared = max(result.peak_shared, now.shared_pages)
                result.peak_hyp_allocated = max(result.peak_hyp_allocated, *(
                    p.allocated_pages for p in now.pools if p.name == "hyp"))
                if time.monotonic() >= next_kill:
                    victim = rng.randrange(len(workers))
                    workers[victim].kill()
                    workers[victim].join()
                    workers[victim] = start_worker()
                    result.kills += 1
                    next_kill += kill_every
            result.seconds = time.monotonic() - start
            for process in workers:  # teardown: every client dies without a goodbye
                process.kill()
                process.join()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                time.sleep(LEASE_SECONDS / 2)
                after = hv.stats()
                if after.nr_vms == 0:
                    break
            result.after = comparable(hv.stats())
            return result
    finally:
        for process in workers:
            if process.is_alive():
                process.kill()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--vms", type=int, default=256)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--kill-every", type=float, default=5.0)
    args = parser.parse_args()
    result = soak(args.seconds, args.vms, args.workers, args.kill_every)
    same = result.after == result.post_boot
    rss = result.rss_mib
    print(f"soak: {args.vms} VMs, {args.workers} client processes, {result.kills} SIGKILLed, "
          f"{result.seconds:.0f} s; peak {result.peak_vms} VMs, {result.peak_hyp_allocated} "
          f"hyp pool pages allocated, {result.peak_shared} pages shared")
    print(f"GetStats after teardown equals post-boot (host stage-2 tables aside): {same}")
    if not same:
        print(f"  post-boot: {result.post_boot}\n  after:     {result.after}")
    print(f"server RSS MiB: start {rss[0]:.0f}, half {rss[len(rss) // 2]:.0f}, end "
          f"{rss[-1]:.0f}, max {max(rss):.0f}; growth over the second half "
          f"{100 * result.rss_growth_second_half:+.1f}%")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
