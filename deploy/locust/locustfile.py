"""Locust for pkvm-sim: the workloads of `pkvm-sim load`, as Locust users, across machines.

Each Locust user is one client VM on the SDK's sync client (its own gRPC channel), running
the same workload code as `pkvm-sim load` (pkvm_sim.tools.load.workloads). Every call is
reported to Locust's request events, request type "grpc", named after the operation:

- an answer: a success named `alloc`, `put`, `share`, ...;
- an expected refusal (a pool or host RAM exhausted, a quota, a pinned page): a *success*
  named `alloc [RESOURCE_EXHAUSTED/...]`, so refusals have their own rows and the run
  does not fail on what a loaded hypervisor legitimately answers;
- anything else (a wrong answer, a transport error): a failure.
Give Locust a `--stop-timeout` (seconds) so that users finish their call and run on_stop;
a user killed before that leaves its VM to the server's lease (--pkvm-lease). When a user
stops, its VM is destroyed and what DestroyVM gives back is checked against the
user's own ledger (a `leak_check` failure if it differs).

    pip install 'pkvm-sim[load]'
    locust -f deploy/locust/locustfile.py --host 127.0.0.1:50051 --pkvm-workload churn \
        --stop-timeout 10
    # distributed: one master, any number of workers (on other machines: --master-host)
    locust -f deploy/locust/locustfile.py --master --host 10.0.0.5:50051 --headless \
        -u 256 -r 32 -t 5m --stop-timeout 10
    locust -f deploy/locust/locustfile.py --worker --master-host 10.0.0.9
    # a server with TLS or a client token: `pkvm-sim load`'s options, prefixed with pkvm-
    locust -f deploy/locust/locustfile.py --host 10.0.0.5:50051 --pkvm-ca-file ca.pem \
        --pkvm-client-token-file token
"""

from __future__ import annotations

import random
import time
from typing import Any

import gevent
from locust import User, constant, events, task
from pkvm_sim.tools.connect import add_connection_arguments, connection_from_args
from pkvm_sim.tools.load.runner import GONE_CODES, ledger_pages
from pkvm_sim.tools.load.sdk import (
    Hypervisor,
    PkvmError,
    VmFacts,
    refusal_of,
    vm_facts,
)
from pkvm_sim.tools.load.workloads import (
    BUILTIN,
    RECYCLE,
    Call,
    VmState,
    Workload,
    is_expected,
    load_workload,
)


def blocking(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run one blocking SDK call on a native thread of gevent's pool; the user's greenlet
    waits cooperatively. (grpc's own gevent integration, `init_gevent()`, was tried first:
    under a few users it lost calls, leaving users blocked forever without a deadline.)

    A refusal comes back as a value and is raised here, in the user's greenlet: raised in
    the pool's thread, gevent's hub would print it as a traceback (one per refusal, even
    for the answers this file counts as fine) before passing it on."""
    def in_thread() -> tuple[bool, Any]:
        try:
            return True, fn(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 (re-raised below, in the greenlet)
            return False, error

    ok, value = gevent.get_hub().threadpool.apply(in_thread)
    if not ok:
        raise value
    return value


PREFIX = "pkvm-"  # --pkvm-tls, --pkvm-ca-file...: Locust has --tls-cert of its own


@events.init_command_line_parser.add_listener
def _pkvm_options(parser: Any) -> None:
    add_connection_arguments(parser, PREFIX)  # `pkvm-sim load`'s TLS and client-token options
    parser.add_argument("--pkvm-workload", default="mixed", include_in_web_ui=True,
                        help=f"one of {', '.join(BUILTIN)} or a TOML file (as pkvm-sim load)")
    parser.add_argument("--pkvm-slice-pages", type=int, default=256,
                        help="host RAM pages per VM")
    parser.add_argument("--pkvm-mmio-base", type=lambda s: int(s, 0), default=0x0900_0000)
    parser.add_argument("--pkvm-mmio-span", type=lambda s: int(s, 0), default=0x7000_0000)
    parser.add_argument("--pkvm-timeout", type=float, default=30.0,
                        help="deadline of each call, seconds")
    parser.add_argument("--pkvm-threads", type=int, default=64,
                        help="native threads per Locust process that carry the gRPC calls")
    parser.add_argument("--pkvm-lease", type=float, default=60.0,
                        help="VM lease, seconds: the server destroys the VM of a user that"
                        " was killed before its on_stop (0: no lease)")


class PkvmUser(User):  # type: ignore[misc]
    """One client VM. Closed loop: each user sends its next call when the last answered."""

    wait_time = constant(0)
    host = "127.0.0.1:50051"

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.workload: Workload = load_workload(opts.pkvm_workload, opts.pkvm_mmio_base,
                                                opts.pkvm_mmio_span)
        self.slice_pages = int(opts.pkvm_slice_pages)
        self.lease = float(opts.pkvm_lease)
        gevent.get_hub().threadpool.maxsize = max(1, int(opts.pkvm_threads))
        self.hv = Hypervisor(self.host, timeout=opts.pkvm_timeout,
                             **connection_from_args(opts, PREFIX).sdk_keywords())
        self.rnd = random.Random()
        self.page_size = int(blocking(self.hv.reserve).page_size)
        self.vm: Any = None
        self.in_flight: Call | None = None  # the call a stop may have interrupted
        self._create()

    def on_stop(self) -> None:
        self._destroy()
        self.hv.close()

    @task
    def next_call(self) -> None:
        if self.vm is None:
            self._create()
            return
        call = self.workload.next_call(self.state, self.rnd)
        if call.method == RECYCLE:
            self._destroy()
            self._create()
            return
        self._run(call)

    def _run(self, call: Call) -> None:
        start = time.perf_counter()
        self.in_flight = call
        try:
            result = blocking(getattr(self.vm, call.method), *call.args)
        except PkvmError as error:
            refusal = refusal_of(error)
            self._report(call.op, start, error, expected=is_expected(call.op, refusal))
            if call.refused:
                call.refused(refusal)
        else:
            self._report(call.op, start)
            if call.done:
                call.done(result)
        self.in_flight = None

    def _report(self, op: str, start: float, error: PkvmError | None = None,
                expected: bool = False) -> None:
        name = op if error is None or not expected else f"{op} [{refusal_of(error).key}]"
        self.environment.events.request.fire(
            request_type="grpc", name=name, response_time=(time.perf_counter() - start) * 1e3,
            response_length=0, exception=None if expected else error, context={},
        )

    def _create(self) -> None:
        start = time.perf_counter()
        try:
            self.vm = blocking(self.hv.create_vm, nr_vcpus=1, slice_pages=self.slice_pages,
                               name="locust", lease_seconds=self.lease or None)
        except PkvmError as error:
            self._report("create_vm", start, error,
                         expected=is_expected("create_vm", refusal_of(error)))
            return
        self._report("create_vm", start)
        self.facts: VmFacts = vm_facts(self.vm)
        self.state = VmState(self.facts.slice_base_pfn, self.facts.slice_pages, self.page_size)

    def _destroy(self) -> None:
        vm, self.vm = self.vm, None
        if vm is None:
            return
        ledger = ledger_pages(self.facts, self.state)
        # A user stopped mid-call cannot know whether that call ran: both answers are right.
        allowed = {ledger, ledger + (self.in_flight.stake if self.in_flight else 0)}
        start = time.perf_counter()
        try:
            returned = int(blocking(vm.destroy))
        except PkvmError as error:
            self._report("destroy_vm", start, error)
            return
        self._report("destroy_vm", start)
        problem = None
        if returned not in allowed:
            problem = f"DestroyVM gave back {returned} pages, the ledger says {ledger}"
        else:
            try:
                blocking(vm.get_page, self.facts.slice_base_pfn)
                problem = "the VM still answers after DestroyVM"
            except PkvmError as error:
                if error.code.name not in GONE_CODES:
                    problem = f"after DestroyVM a call with its token got {error.code.name}"
        self.environment.events.request.fire(
            request_type="check", name="leak_check", response_time=0, response_length=0,
            exception=AssertionError(f"VM {self.facts.handle:#x}: {problem}") if problem
            else None, context={},
        )
