"""The asyncio load runner: many client VMs over a few gRPC connections.

Each client VM is one task that runs its workload's calls one after another (a VM's next
call often depends on the last answer). Two loops:

- closed loop (no --rps): each VM sends its next call as soon as the last one answered;
- open loop (--rps R): each VM has a schedule of intended send times (R / vms per second,
  staggered across VMs) and latency is measured from the *intended* time, so a server that
  stalls is charged for the whole stall (no coordinated omission).

Results recorded before the warm-up ends are dropped. At the end every VM the run created is
destroyed and checked against its own ledger (see `leak_check`), so other clients of the
same server cannot make the check fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, TextIO

from ..connect import Connection
from .interrupts import Interrupts
from .recorder import PoolSample, Recorder
from .sdk import (
    AsyncHypervisor,
    AsyncVM,
    Batch,
    PkvmError,
    Refusal,
    ServerFigures,
    VmFacts,
    pool_figures,
    refusal_of,
    vm_facts,
)
from .workloads import RECYCLE, Call, VmState, Workload

GONE_CODES = frozenset({"NOT_FOUND", "UNAUTHENTICATED", "PERMISSION_DENIED"})


class Unreachable(Exception):
    """The target did not answer: bad usage or a server that is down (exit 2)."""


@dataclass(frozen=True)
class Shape:
    """The run's shape, straight from the command line."""

    target: str
    vms: int
    connections: int
    duration: float | None  # seconds measured, None with --total
    total: int | None  # operations measured, None with --duration
    rps: float  # 0: closed loop
    warmup: float
    seed: int
    batch: int  # 0: unary calls
    slice_pages: int
    max_ops: int  # per VM, 0: no limit
    timeout: float
    connect_timeout: float
    sample_interval: float
    progress: str  # "tty", "lines" or "none"
    progress_interval: float
    connection: Connection = Connection()  # TLS and client token: plaintext by default


@dataclass
class LeakCheck:
    vms_created: int = 0
    vms_destroyed: int = 0
    problems: list[str] = field(default_factory=list)
    server_wide: str = "not run"

    @property
    def ok(self) -> bool:
        return not self.problems and self.vms_created == self.vms_destroyed


@dataclass(frozen=True)
class ServerIdentity:
    """Which server answered: its kernel profile (Reserve) and its process's instance id
    (GetStats; new at every start), so an archived report names what it measured."""

    profile: str = ""
    instance_id: str = ""
    page_size: int = 4096


@dataclass
class RunResult:
    recorder: Recorder
    measured_s: float
    leak: LeakCheck
    page_size: int
    vms_started: int
    server: ServerIdentity = field(default_factory=ServerIdentity)
    interrupted: str | None = None  # the signal that stopped the run (SIGINT, SIGTERM)
    first_create_refusal: str = ""  # why a VM could not be created, e.g. CODE/REASON
    vms_lost: int = 0  # VMs whose recycle could not create the next VM: they stopped early


@dataclass
class Client:
    """One client VM of the run and its workload state."""

    index: int
    hv: AsyncHypervisor
    rnd: random.Random
    vm: AsyncVM | None = None
    facts: VmFacts | None = None
    state: VmState | None = None
    stream: Any = None
    calls: int = 0


class LoadRun:
    def __init__(self, shape: Shape, workload: Workload, out: TextIO | None = None,
                 interrupts: Interrupts | None = None) -> None:
        self.shape = shape
        self.workload = workload
        self.out = sys.stderr if out is None else out  # looked up now: tests swap stderr
        self.interrupts = Interrupts() if interrupts is None else interrupts
        self.interrupts.on_stop = self._stop
        self.server = ServerIdentity()
        self.first_create_refusal = ""
        self.vms_lost = 0
        self.recorder = Recorder()
        self.leak = LeakCheck()
        self.page_size = 4096
        self.started = 0.0
        self.measure_from = 0.0
        self.stop_at = float("inf")
        self.stopping = False
        self.vms_started = 0
        self._last_progress = (0.0, 0)  # (when, measured operations) of the last progress

    # -- the run -------------------------------------------------------------------------------

    async def run(self) -> RunResult:
        shape = self.shape
        # The VMs' calls go over --connections channels with the --timeout deadline; Reserve
        # and the GetStats samples over one more, with the --connect-timeout deadline.
        # Every channel has the same TLS and client-token settings (--tls, --client-token-file).
        sdk = shape.connection.sdk_keywords()
        control = AsyncHypervisor(shape.target, timeout=shape.connect_timeout, **sdk)
        conns = [AsyncHypervisor(shape.target, timeout=shape.timeout, **sdk)
                 for _ in range(shape.connections)]
        try:
            await self._connect(control, conns)
            before = await self._figures(control)
            self.started = time.perf_counter()
            self.measure_from = self.started + shape.warmup
            if shape.duration is not None:
                self.stop_at = self.measure_from + shape.duration
            sampler = asyncio.create_task(self._sample_loop(control))
            clients = [Client(i, conns[i % len(conns)], random.Random(
                shape.seed * 1_000_003 + i)) for i in range(shape.vms)]
            await asyncio.gather(*(self._client_loop(c) for c in clients))
            ended = time.perf_counter()
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
            await self._sample(control, ended)
            self._progress(ended, final=True)
            after = await self._figures(control)
            self.leak.server_wide = server_wide_check(before, after)
            if self.leak.server_wide.startswith("FAILED"):
                self.leak.problems.append(self.leak.server_wide)
            measured = max(0.0, ended - self.measure_from)
            return RunResult(self.recorder, measured, self.leak, self.page_size,
                             self.vms_started, self.server, self.interrupts.name,
                             self.first_create_refusal, self.vms_lost)
        finally:
            for conn in [control, *conns]:
                await conn.close()

    async def _figures(self, control: AsyncHypervisor) -> ServerFigures | None:
        try:
            stats = await control.stats()
        except PkvmError:
            return None
        if not self.server.instance_id:
            self.server = replace(self.server, instance_id=str(stats.instance_id))
        return pool_figures(stats)

    async def _connect(self, control: AsyncHypervisor, conns: list[AsyncHypervisor]) -> None:
        try:
            for conn in [control, *conns]:
                await asyncio.wait_for(conn.channel.channel_ready(), self.shape.connect_timeout)
            reserve = await control.reserve()
        except TimeoutError:
            raise Unreachable(f"cannot reach {self.shape.target}: no connection within"
                              f" {self.shape.connect_timeout:g} s") from None
        except PkvmError as error:
            raise Unreachable(f"{self.shape.target} refused Reserve: {error.code.name}"
                              f" {error.message}") from None
        self.page_size = int(reserve.page_size)
        self.server = replace(self.server, profile=str(reserve.profile),
                              page_size=self.page_size)

    def _stop(self) -> None:
        """A stop signal (see interrupts.py): each VM ends after its call in flight, and is
        destroyed and checked as usual. Called from the signal handler: it sets a flag and
        says so."""
        self.stopping = True
        self.out.write(f"\npkvm-sim load: {self.interrupts.name}: stopping; the run's VMs are"
                       " destroyed and checked, then the reports written (again: quit at once)\n")
        self.out.flush()

    def _done(self, client: Client) -> bool:
        shape = self.shape
        return (self.stopping or time.perf_counter() >= self.stop_at
                or (shape.total is not None and self.recorder.measured_ops >= shape.total)
                or (shape.max_ops > 0 and client.calls >= shape.max_ops))

    # -- one client VM -------------------------------------------------------------------------

    async def _client_loop(self, client: Client) -> None:
        if self.stopping or not await self._create(client):
            return
        self.vms_started += 1
        rate = self.shape.rps / self.shape.vms if self.shape.rps else 0.0
        # The schedule starts once the VM exists, staggered over one period across VMs.
        next_send = time.perf_counter() + (client.index / self.shape.rps if rate else 0.0)
        try:
            while not self._done(client):
                intended = time.perf_counter()
                if rate:
                    if next_send > intended:
                        await asyncio.sleep(next_send - intended)
                    intended = next_send
                sent = await self._step(client, intended)
                if rate:
                    next_send += sent / rate
                if client.vm is None:  # a recycle could not create the new VM
                    self.vms_lost += 1
                    return
            await self._drain(client)
        finally:
            await self._destroy(client)

    async def _drain(self, client: Client) -> None:
        """Send the follow-ups still due (the put after a get): in a batch a put of the
        same block may have left the ledger already, so the block is only free once the
        follow-up ran. A follow-up never queues more than one more."""
        state = client.state
        while state is not None and state.pending and client.vm is not None:
            call = state.pending.popleft()
            if call.method != RECYCLE:
                await self._unary(client, call, time.perf_counter())

    async def _create(self, client: Client) -> bool:
        start = time.perf_counter()
        try:
            vm = await client.hv.create_vm(nr_vcpus=1, slice_pages=self.shape.slice_pages,
                                           name=f"load-{client.index}")
        except PkvmError as error:
            refusal = refusal_of(error)
            self._record("create_vm", start, refusal, force=True)
            self.first_create_refusal = self.first_create_refusal or \
                f"{refusal.key} {error.message}".strip()
            return False
        self._record("create_vm", start, None, force=True)
        self.leak.vms_created += 1
        client.vm, client.facts = vm, vm_facts(vm)
        client.state = VmState(client.facts.slice_base_pfn, client.facts.slice_pages,
                               self.page_size)
        return True

    async def _step(self, client: Client, intended: float) -> int:
        """Send the client's next call (or batch); returns how many operations went out."""
        assert client.state is not None
        call = self.workload.next_call(client.state, client.rnd)
        if call.method == RECYCLE:
            await self._destroy(client)
            await self._create(client)
            return 1
        if self.shape.batch and call.batchable:
            return await self._batch(client, call, intended)
        await self._unary(client, call, intended)
        return 1

    async def _unary(self, client: Client, call: Call, intended: float) -> None:
        client.calls += 1
        try:
            result = await getattr(client.vm, call.method)(*call.args)
        except PkvmError as error:
            refusal = refusal_of(error)
            self._record(call.op, intended, refusal)
            if call.refused:
                call.refused(refusal)
            return
        self._record(call.op, intended, None)
        if call.done:
            call.done(result)

    async def _batch(self, client: Client, first: Call, intended: float) -> int:
        """Up to --batch calls in one Execute; a call without a BatchOp waits for the next."""
        assert client.state is not None and client.vm is not None
        calls = [first]
        while len(calls) < self.shape.batch:
            call = self.workload.next_call(client.state, client.rnd)
            if not call.batchable or call.method == RECYCLE:
                client.state.pending.appendleft(call)
                break
            calls.append(call)
        batch = Batch()
        for call in calls:
            getattr(batch, call.method)(*call.args)
        client.calls += len(calls)
        if client.stream is None:
            client.stream = client.vm.stream()
        try:
            result = await client.stream.execute(batch)
        except PkvmError as error:
            await self._close_stream(client)
            for call in calls:
                self._record(call.op, intended, refusal_of(error))
            return len(calls)
        end = time.perf_counter()
        tally: dict[tuple[str, Refusal | None], int] = {}
        for call, value in zip(calls, result, strict=True):
            refusal = refusal_of(value) if isinstance(value, PkvmError) else None
            tally[(call.op, refusal)] = tally.get((call.op, refusal), 0) + 1
            if refusal is None and call.done:
                call.done(value)
            elif refusal is not None and call.refused:
                call.refused(refusal)
        for (op, refusal), count in tally.items():
            self._record(op, intended, refusal, count=count, end=end)
        return len(calls)

    async def _close_stream(self, client: Client) -> None:
        stream, client.stream = client.stream, None
        if stream is not None:
            with contextlib.suppress(PkvmError):
                await stream.close()

    async def _destroy(self, client: Client) -> None:
        """Destroy the client's VM and check what came back against its ledger."""
        vm, facts, state = client.vm, client.facts, client.state
        if vm is None or facts is None or state is None:
            return
        client.vm = None
        await self._close_stream(client)
        ledger = ledger_pages(facts, state)
        start = time.perf_counter()
        try:
            returned = await vm.destroy()
        except PkvmError as error:
            self._record("destroy_vm", start, refusal_of(error), force=True)
            self.leak.problems.append(f"VM {facts.handle:#x}: DestroyVM failed:"
                                      f" {error.code.name} {error.message}")
            return
        self._record("destroy_vm", start, None, force=True)
        self.leak.vms_destroyed += 1
        if returned != ledger:
            self.leak.problems.append(
                f"VM {facts.handle:#x}: DestroyVM gave back {returned} pages, its ledger says"
                f" {ledger} ({state.held_pages} hyp + {facts.slice_pages} slice +"
                f" {facts.donated_pages} donated + {state.topped_up} memcache)")
        try:
            await vm.get_page(facts.slice_base_pfn)
        except PkvmError as error:
            if error.code.name not in GONE_CODES:
                self.leak.problems.append(f"VM {facts.handle:#x}: after DestroyVM a call"
                                          f" with its token got {error.code.name}")
        else:
            self.leak.problems.append(f"VM {facts.handle:#x}: still answers after DestroyVM")

    def _record(self, op: str, since: float, refusal: Refusal | None, *, count: int = 1,
                end: float | None = None, force: bool = False) -> None:
        end = time.perf_counter() if end is None else end
        if end < self.measure_from and not force:
            return  # warm-up
        self.recorder.record(op, end - since, end - self.measure_from, refusal, count)

    # -- pool pressure and progress --------------------------------------------------------------

    async def _sample_loop(self, hv: AsyncHypervisor) -> None:
        """A GetStats sample every --sample-interval; progress with each sample on a
        terminal, every --progress-interval as plain lines."""
        shape = self.shape
        tick = min(shape.sample_interval, shape.progress_interval)
        next_sample = next_progress = time.perf_counter()
        next_progress += shape.progress_interval
        while True:
            now = time.perf_counter()
            if now >= next_sample:
                await self._sample(hv, now)
                next_sample += shape.sample_interval
                if shape.progress == "tty":
                    self._progress(now)
            if shape.progress == "lines" and now >= next_progress:
                self._progress(now)
                next_progress += shape.progress_interval
            await asyncio.sleep(max(0.0, min(next_sample, next_progress) - time.perf_counter(),
                                    tick / 10))

    async def _sample(self, hv: AsyncHypervisor, now: float) -> None:
        if now < self.measure_from:
            return
        try:
            figures = pool_figures(await hv.stats())
        except PkvmError:
            return  # a missed sample; the calls themselves report the trouble
        self.recorder.samples.append(PoolSample(now - self.measure_from, figures))

    def _progress(self, now: float, final: bool = False) -> None:
        if self.shape.progress == "none":
            return
        # The final line gives the whole run's rate, the others the rate since the last line.
        since = (self.measure_from, 0) if final else self._last_progress
        line = progress_line(self, now, since)
        self._last_progress = (now, self.recorder.measured_ops)
        if self.shape.progress == "tty":
            self.out.write("\r" + line + "\x1b[K" + ("\n" if final else ""))
        elif not final:
            self.out.write(line + "\n")
        self.out.flush()


def ledger_pages(facts: VmFacts, state: VmState) -> int:
    """What DestroyVM must give back for this VM: the hyp blocks it still holds, its slice,
    the pages donated at creation and every page it topped its memcache up with."""
    return state.held_pages + facts.slice_pages + facts.donated_pages + state.topped_up


def server_wide_check(before: ServerFigures | None, after: ServerFigures | None) -> str:
    """The whole hyp pool back where it was: meaningful only when no other client held a VM
    before or after the run, so it is skipped (not failed) otherwise."""
    if before is None or after is None:
        return "skipped: GetStats did not answer"
    vms_before, pools_before = before.nr_vms, before.pools
    vms_after, pools_after = after.nr_vms, after.pools
    if vms_before or vms_after:
        return (f"skipped: other VMs on the server ({vms_before} before, {vms_after} after);"
                " the per-VM ledgers are the check")
    free = {p.name: p.free_pages for p in pools_before}
    hyp_after = next((p.free_pages for p in pools_after if p.name == "hyp"), None)
    if free.get("hyp") == hyp_after:
        return f"ok: hyp pool back to {hyp_after} free pages"
    return f"FAILED: hyp pool free pages {free.get('hyp')} before, {hyp_after} after"


def progress_line(run: LoadRun, now: float, last: tuple[float, int]) -> str:
    shape, rec = run.shape, run.recorder
    t = now - run.measure_from
    if t < 0:
        phase = f"warm-up {-t:4.1f}s left"
    else:
        limit = f"/{shape.duration:g}s" if shape.duration is not None else ""
        phase = f"{t:6.1f}s{limit}"
    since, ops_then = last
    start = since or run.measure_from  # the first line counts from the end of the warm-up
    rate = (rec.measured_ops - ops_then) / (now - start) if now > start else 0.0
    expected = sum(s.expected for s in rec.seconds.values())
    unexpected = sum(s.unexpected for s in rec.seconds.values())
    pools = ""
    if rec.samples:
        server = rec.samples[-1].server
        pools = "  " + " ".join(f"{p.name} free {p.free_pages}" for p in server.pools) + \
            f"  recycles {server.mmio_recycles}  vms {server.nr_vms}"
    return (f"[{phase}] {rec.measured_ops} ops  {rate:,.0f} ops/s  refused: {expected}"
            f" expected, {unexpected} unexpected{pools}")


def run_load(shape: Shape, workload: Workload, out: TextIO | None = None,
             interrupts: Interrupts | None = None) -> RunResult:
    return asyncio.run(LoadRun(shape, workload, out, interrupts).run())

