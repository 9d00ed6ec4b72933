"""`pkvm-sim load`: load-test a running pkvm-sim service with many concurrent client VMs.

    pkvm-sim load --target 127.0.0.1:50051 --vms 64 --duration 30 --html report.html

Modules: `sdk` (the only door to the SDK), `workloads` (what each VM asks next; shared with
deploy/locust/locustfile.py), `runner` (asyncio, open or closed loop, leak check), `recorder`
(HdrHistogram latencies, outcomes, pool samples), `report` (JSON dict, table, CSV) and `html`.
`pkvm-sim loadgen` is an alias that also takes the old flags.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..connect import Connection, add_connection_arguments, connection_from_args
from .interrupts import Abort, Interrupts
from .workloads import BUILTIN, WorkloadError, load_workload

if TYPE_CHECKING:
    from .runner import Shape

DEFAULTS: dict[str, Any] = {
    "target": "127.0.0.1:50051", "vms": 16, "connections": 1, "duration": 10.0, "rps": 0.0,
    "warmup": 0.0, "seed": 1, "batch": 0, "slice_pages": 256, "max_ops": 0, "timeout": 30.0,
    "connect_timeout": 5.0, "sample_interval": 0.5, "progress_interval": 5.0,
    "mmio_base": 0x0900_0000, "mmio_span": 0x7000_0000, "workload": "mixed",
}
MAX_BATCH = 4096  # the service's own limit per Execute request (pkvm_client.MAX_BATCH_OPS)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default, except where the help text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def _int(text: str) -> int:
    return int(text, 0)


VERDICT_HELP = (
    "Exit status: 0 only when the run made what it was asked (every VM, the whole duration"
    " or total), nothing unexpected came back, the leak check passed and every report was"
    " written; 1 otherwise (the report lists why); 2 bad usage, an unwritable report path or"
    " an unreachable target; 130 / 143 when SIGINT / SIGTERM stopped the run (its VMs are"
    " destroyed and every report written, marked interrupted). See README.md, \"The load"
    " tool's verdict\"."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = _HelpFormatter
    parser.epilog = VERDICT_HELP
    d = DEFAULTS
    shape = parser.add_argument_group("shape")
    shape.add_argument("--target", default=d["target"], help="HOST:PORT of the service")
    shape.add_argument("--vms", type=int, default=d["vms"], help="concurrent client VMs")
    shape.add_argument("--connections", type=int, default=d["connections"],
                       help="gRPC channels the VMs are spread over")
    stop = shape.add_mutually_exclusive_group()
    stop.add_argument("--duration", type=float, default=None,
                      help=f"seconds measured after the warm-up (default {d['duration']:g}"
                      " unless --total; no upper limit)")
    stop.add_argument("--total", type=int, default=None,
                      help="stop after this many measured operations (instead of --duration)")
    shape.add_argument("--rps", type=float, default=d["rps"],
                       help="open loop at this many operations/s over all VMs, latency from"
                       " the intended send time; 0: closed loop, as fast as answers come")
    shape.add_argument("--warmup", type=float, default=d["warmup"],
                       help="seconds run first and left out of the results")
    shape.add_argument("--seed", type=int, default=d["seed"], help="seed of every VM's mix")
    shape.add_argument("--batch", type=int, default=d["batch"],
                       help=f"send calls in Execute batches of N (1..{MAX_BATCH}); 0: unary")
    shape.add_argument("--slice-pages", type=int, default=d["slice_pages"],
                       help="host RAM pages per VM")
    shape.add_argument("--max-ops", type=int, default=d["max_ops"],
                       help="calls per VM before it stops (0: no limit)")
    shape.add_argument("--timeout", type=float, default=d["timeout"],
                       help="deadline of each call, seconds")
    shape.add_argument("--connect-timeout", type=float, default=d["connect_timeout"],
                       help="seconds to wait for the target before giving up (exit 2)")
    work = parser.add_argument_group("workload")
    work.add_argument("--workload", default=d["workload"],
                      help=f"one of {', '.join(BUILTIN)}, or a TOML file (see README)")
    work.add_argument("--mmio-base", type=_int, default=d["mmio_base"],
                      help="lowest MMIO address the mmio operation faults on")
    work.add_argument("--mmio-span", "--mmio-window", dest="mmio_span", type=_int,
                      default=d["mmio_span"], help="bytes of MMIO address space it spreads over")
    out = parser.add_argument_group("output")
    out.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                     help="write the report as JSON (no FILE or '-': to stdout)")
    out.add_argument("--csv", default=None, metavar="FILE", help="one row per operation")
    out.add_argument("--html", default=None, metavar="FILE",
                     help="a self-contained report with pictures (needs pkvm-sim[load])")
    out.add_argument("--progress", choices=("auto", "tty", "lines", "none"), default="auto",
                     help="live progress on stderr: auto = tty on a terminal, else lines")
    out.add_argument("--progress-interval", type=float, default=d["progress_interval"],
                     help="seconds between plain progress lines")
    out.add_argument("--sample-interval", type=float, default=d["sample_interval"],
                     help="seconds between GetStats samples of pool pressure")
    add_connection_arguments(parser)


def _usage_error(args: argparse.Namespace) -> str | None:
    checks = [
        (args.vms >= 1, "--vms must be at least 1"),
        (args.connections >= 1, "--connections must be at least 1"),
        (args.duration is None or args.duration > 0, "--duration must be positive"),
        (args.total is None or args.total >= 1, "--total must be at least 1"),
        (args.rps >= 0, "--rps must be 0 (closed loop) or positive"),
        (args.warmup >= 0, "--warmup must not be negative"),
        (0 <= args.batch <= MAX_BATCH, f"--batch must be 0..{MAX_BATCH}"),
        (args.slice_pages >= 1, "--slice-pages must be at least 1"),
        (args.max_ops >= 0, "--max-ops must not be negative"),
        (args.timeout > 0 and args.connect_timeout > 0, "timeouts must be positive"),
        (args.sample_interval > 0 and args.progress_interval > 0,
         "intervals must be positive"),
        (args.mmio_base >= 0 and args.mmio_span > 0, "--mmio-span must be positive"),
        (args.html is None or importlib.util.find_spec("matplotlib") is not None,
         "--html needs matplotlib: pip install 'pkvm-sim[load]'"),
    ]
    return next((message for ok, message in checks if not ok), None)


EXIT_USAGE = 2


def output_problem(args: argparse.Namespace) -> str | None:
    """Every report file can be written: its directory is made (as `draw --out` does) and
    must be writable, and the path must not be a directory. Checked before the run, so a
    long run never ends with its report lost."""
    for flag, path in (("--json", args.json), ("--csv", args.csv), ("--html", args.html)):
        if path is None or path == "-":
            continue
        out = Path(path)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            return f"{flag} {path}: cannot make its directory: {error.strerror}"
        if out.is_dir():
            return f"{flag} {path}: is a directory"
        if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
            return f"{flag} {path}: not writable"
    return None


def run(args: argparse.Namespace) -> int:
    from .runner import Unreachable, run_load

    prog = "pkvm-sim " + getattr(args, "command", "load")
    problem = _usage_error(args) or output_problem(args)
    if problem is None:
        try:
            workload = load_workload(args.workload, args.mmio_base, args.mmio_span)
            connection = connection_from_args(args)
        except WorkloadError as error:
            problem = str(error)
        except (OSError, ValueError) as error:  # an unreadable PEM or token file
            problem = f"error: {error}"
    if problem is not None:
        print(f"{prog}: {problem}", file=sys.stderr)
        return EXIT_USAGE
    shape = shape_from_args(args, connection)
    interrupts = Interrupts()
    with interrupts.installed():
        try:
            try:
                result = run_load(shape, workload, interrupts=interrupts)
            except Unreachable as error:
                print(f"{prog}: {error}", file=sys.stderr)
                return EXIT_USAGE
            interrupts.stopping_allowed = False  # from here a signal ends the process
            return report_and_write(shape, workload, result, args, interrupts)
        except Abort as abort:
            when = f"a second {abort}" if abort.second else f"{abort} while writing the reports"
            _exit_now(f"{prog}: stopped at once by {when} (reports not yet written are"
                      " missing; a VM left behind is the server's to reclaim)",
                      128 + abort.signum)
    raise AssertionError("unreachable")  # pragma: no cover


def report_and_write(shape: Shape, workload: Any, result: Any, args: argparse.Namespace,
                     interrupts: Interrupts) -> int:
    from .report import build_report

    exit_code = interrupts.exit_code() if interrupts.first is not None else None
    report = build_report(shape, workload, result, exit_code)
    write_outputs(report, args)
    return int(report["exit_code"])


def _exit_now(message: str, code: int) -> None:
    """Leave at once and quietly: no traceback, no gRPC shutdown noise from half-closed
    channels (os._exit skips the interpreter's teardown)."""
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
    print(message, file=sys.stderr, flush=True)
    os._exit(code)


def shape_from_args(args: argparse.Namespace, connection: Connection | None = None) -> Shape:
    """The run's shape, exactly as asked: no limit is cut or capped."""
    from .runner import Shape

    progress = args.progress
    if progress == "auto":
        progress = "tty" if sys.stderr.isatty() else "lines"
    duration = args.duration
    if duration is None and args.total is None:
        duration = DEFAULTS["duration"]
    return Shape(
        target=args.target, vms=args.vms, connections=args.connections, duration=duration,
        total=args.total, rps=args.rps, warmup=args.warmup, seed=args.seed, batch=args.batch,
        slice_pages=args.slice_pages, max_ops=args.max_ops, timeout=args.timeout,
        connect_timeout=args.connect_timeout, sample_interval=args.sample_interval,
        progress=progress, progress_interval=args.progress_interval,
        connection=connection or Connection(),
    )


def write_outputs(report: dict[str, Any], args: argparse.Namespace) -> None:
    """The JSON and CSV files first (fast: they survive a SIGKILL that follows a SIGTERM while
    the HTML is drawn), then the HTML, then the table. A report that cannot be written fails
    the run (exit 1); the JSON and CSV are then written again with that verdict."""
    from .report import csv_text, decide, table_text

    def attempt(flag: str, path: str, text: Any) -> None:
        try:
            Path(path).write_text(text())
        except (OSError, ValueError) as error:
            report["reports_not_written"].append(f"{flag} {path}")
            report["reasons"].append(f"{flag} {path} not written: {error}")
            decide(report, report["exit_code"] if report["interrupted"] else None)

    def data_files() -> None:
        if args.json and args.json != "-" and f"--json {args.json}" not in \
                report["reports_not_written"]:
            attempt("--json", args.json, lambda: json.dumps(report, indent=2) + "\n")
        if args.csv and f"--csv {args.csv}" not in report["reports_not_written"]:
            attempt("--csv", args.csv, lambda: csv_text(report))

    data_files()
    if args.html:
        from .html import render

        print(f"pkvm-sim load: drawing {args.html} ...", file=sys.stderr, flush=True)
        failed_before = len(report["reports_not_written"])
        attempt("--html", args.html, lambda: render(report))
        if len(report["reports_not_written"]) > failed_before:
            data_files()  # the verdict changed: say so in the files already written
    table_to = sys.stderr if args.json == "-" else sys.stdout
    table_to.write(table_text(report))
    table_to.flush()
    if args.json == "-":
        print(json.dumps(report, indent=2), flush=True)
