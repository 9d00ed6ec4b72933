"""`pkvm-sim sweep GRID.toml`: many independent simulator runs as tasks on Dask.

    pkvm-sim sweep examples/sweep.toml --out rows.parquet           # a local Dask cluster
    pkvm-sim sweep examples/sweep.toml --out rows.csv --workers 2
    pkvm-sim sweep GRID.toml --scheduler tcp://10.0.0.5:8786 --out rows.parquet
    pkvm-sim sweep GRID.toml --scheduler none --out rows.csv         # in this process
    pkvm-sim sweep examples/sweep.toml --out rows.csv --plot sweep.png

A grid (TOML, examples/sweep.toml) lists what to run, kernel profiles, page sizes, memory maps
(named machines), guest shapes and seeds. Each run uses only some of those dimensions
(RUN_DIMENSIONS), and a point is one combination of the dimensions its run uses: `reserve`
does not depend on guest shapes or seeds, so they do not multiply its points.

Each point is one task (`run_point`), a pure function of the point: the same grid gives the
same rows whatever runs it (in process, 1 or 20 workers, an external cluster). A point that
fails is a row with its `error`, never a lost row. Ctrl-C keeps the rows already finished,
writes them, and says how many points are missing.

Needs the `sweep` extra (dask[distributed]; pyarrow for parquet): pip install 'pkvm-sim[sweep]'.
The service does not depend on it.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import itertools
import logging
import os
import signal
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pkvm_sim.core.config import SimConfig, parse_size
from pkvm_sim.core.layout import GIB, PAGE_SIZES
from pkvm_sim.core.profiles import kernel_profile_names, profile_spec

from .capacity import GuestShape, capacity, size_label
from .scenario import DEFAULT_SPANS

EXIT_OK = 0
EXIT_FAILED_POINTS = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
CONNECT_S = 30.0  # to reach a scheduler given by --scheduler
WAIT_WORKERS_S = 600.0  # for --wait-workers

RUNS = ("reserve", "capacity", "vm-lifecycle", "mmio-pressure")
# The grid dimensions each run depends on (profile, page size and machine: all of them).
RUN_DIMENSIONS: dict[str, tuple[str, ...]] = {
    "reserve": (),
    "capacity": ("shape",),
    "vm-lifecycle": (),
    "mmio-pressure": ("seed",),
}

# The row schema: every row has every column (None where the run does not fill it), so the
# parquet and CSV files have one fixed set of columns whatever the grid.
POINT_COLUMNS = ("point", "run", "profile", "page_size", "machine", "memory_bytes", "shape",
                 "vcpus", "guest_memory_bytes", "touched_bytes", "seed")
RESULT_COLUMNS = (
    "error",
    # reserve: kvm_hyp_reserve's figures
    "reserved_bytes", "hyp_mem_pages", "vmemmap_pages", "hyp_s1_pgtable_pages",
    "host_s2_pgtable_pages",
    # capacity
    "vms", "binding_limit", "reason", "hyp_pool_pages", "hyp_pool_free_pages",
    "host_s2_pool_free_pages", "host_ram_free_pages", "host_ram_largest_free_run_pages",
    "first_vm_hyp_pool_pages",
    "first_vm_donated_pages",
    # vm-lifecycle
    "vm_limit",
    # mmio-pressure
    "mmio_faults", "mmio_faults_before_recycle", "recycles", "recycled_pages", "failures",
    "pool_pages_used_peak",
)
COLUMNS = POINT_COLUMNS + RESULT_COLUMNS
DEFAULT_MMIO_SPANS = tuple(DEFAULT_SPANS.split(","))  # scenario mmio-pressure's
MMIO_FAULTS_PER_SPAN = 200  # a grid's default: a tenth of the scenario's, for many points
Row = dict[str, Any]


# --------------------------------------------------------------------------------------------
# The grid and its points
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    """One task: everything `run_point` needs, picklable, nothing else."""

    index: int
    run: str
    profile: str
    page_size: str  # '4K'
    machine: str  # the memory map's name in the grid
    memblocks: tuple[str, ...]  # 'BASE:SIZE'
    config: tuple[tuple[str, Any], ...] = ()  # extra SimConfig knobs (the grid's [config])
    shape_name: str = ""
    shape: GuestShape | None = None
    seed: int | None = None
    options: tuple[tuple[str, Any], ...] = ()  # the run's own table (e.g. [mmio-pressure])

    def sim_config(self) -> SimConfig:
        return SimConfig.from_mapping({**dict(self.config), "profile": self.profile,
                                       "page_size": self.page_size,
                                       "memblocks": list(self.memblocks)})

    @property
    def memory_bytes(self) -> int:
        return sum(parse_size(m.partition(":")[2]) for m in self.memblocks)

    def cost_estimate(self) -> int:
        """A rough relative run time, to start the longest points first (fewer idle workers
        at the end of a sweep): capacity adds up to RAM / guest memory VMs; mmio-pressure
        runs its faults; reserve is arithmetic."""
        if self.run == "capacity" and self.shape is not None:
            return 10 + min(self.memory_bytes // self.shape.memory_bytes, 4096)
        if self.run == "mmio-pressure":
            options = dict(self.options)
            return 10 + int(options.get("faults_per_span", MMIO_FAULTS_PER_SPAN)) * len(
                options.get("spans", DEFAULT_MMIO_SPANS))
        return 1

    def row(self) -> Row:
        """The point's own columns, every result column None."""
        shape = self.shape
        row: Row = dict.fromkeys(COLUMNS)
        row.update(
            point=self.index, run=self.run, profile=self.profile,
            page_size=PAGE_SIZES[self.page_size], machine=self.machine,
            memory_bytes=self.memory_bytes,
            shape=self.shape_name or None, seed=self.seed,
            vcpus=shape.vcpus if shape else None,
            guest_memory_bytes=shape.memory_bytes if shape else None,
            touched_bytes=shape.touched_bytes if shape else None,
        )
        return row


@dataclass(frozen=True)
class Grid:
    runs: tuple[str, ...]
    profiles: tuple[str, ...]
    page_sizes: tuple[str, ...]
    machines: tuple[tuple[str, tuple[str, ...]], ...]
    shapes: tuple[tuple[str, GuestShape], ...] = ()
    seeds: tuple[int, ...] = (1,)
    config: tuple[tuple[str, Any], ...] = ()
    options: dict[str, tuple[tuple[str, Any], ...]] = field(default_factory=dict)

    def points(self) -> list[Point]:
        """Every point, in a fixed order: run, profile, page size, machine, shape, seed."""
        points: list[Point] = []
        for run, profile, page_size, (machine, memblocks) in itertools.product(
                self.runs, self.profiles, self.page_sizes, self.machines):
            dims = RUN_DIMENSIONS[run]
            shapes = self.shapes if "shape" in dims else (("", None),)
            seeds: Sequence[int | None] = self.seeds if "seed" in dims else (None,)
            for (shape_name, shape), seed in itertools.product(shapes, seeds):
                points.append(Point(len(points), run, profile, page_size, machine, memblocks,
                                    self.config, shape_name, shape, seed,
                                    self.options.get(run, ())))
        return points


def load_grid(path: str | Path) -> Grid:
    """Read and check a grid file; ValueError naming what is wrong."""
    try:
        doc = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ValueError(f"{path}: {error}") from error
    return parse_grid(doc)


def parse_grid(doc: dict[str, Any]) -> Grid:
    known = {"runs", "profiles", "page_sizes", "machines", "shapes", "seeds", "config", *RUNS}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise ValueError(f"unknown grid key(s) {', '.join(unknown)}:"
                         f" use {', '.join(sorted(known))}")
    runs = _names(doc, "runs", RUNS)
    profiles = tuple(_profiles(doc.get("profiles", ["v6.12"])))
    page_sizes = tuple(str(p) for p in doc.get("page_sizes", ["4K"]))
    for page_size in page_sizes:
        if page_size not in PAGE_SIZES:
            raise ValueError(f"page size {page_size!r}: choose from {', '.join(PAGE_SIZES)}")
    machines = tuple((str(name), tuple(str(m) for m in _list(blocks, f"machines.{name}")))
                     for name, blocks in _table(doc, "machines", required=True).items())
    shapes = tuple((str(name), _shape(name, spec))
                   for name, spec in _table(doc, "shapes").items())
    if "capacity" in runs and not shapes:
        raise ValueError("run 'capacity' needs at least one guest shape in [shapes]")
    seeds = tuple(int(s) for s in doc.get("seeds", [1]))
    config = tuple(sorted(_table(doc, "config").items()))
    options = {run: tuple(sorted(_table(doc, run).items())) for run in RUNS if run in doc}
    grid = Grid(runs, profiles, page_sizes, machines, shapes, seeds, config, options)
    for point in grid.points()[:1]:
        point.sim_config()  # a bad memblock or knob fails here, not in every task
    return grid


def _names(doc: dict[str, Any], key: str, allowed: Sequence[str]) -> tuple[str, ...]:
    names = tuple(str(v) for v in _list(doc.get(key), key))
    bad = [n for n in names if n not in allowed]
    if not names or bad:
        raise ValueError(f"{key} must list some of {', '.join(allowed)}, not {names!r}")
    return names


def _profiles(values: Any) -> Iterable[str]:
    for value in _list(values, "profiles"):
        if value == "all":
            yield from kernel_profile_names()
        else:
            yield profile_spec(str(value)).profile.value  # ValueError for an unknown one


def _list(value: Any, key: str) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"{key} must be a list, not {value!r}")
    return value


def _table(doc: dict[str, Any], key: str, *, required: bool = False) -> dict[str, Any]:
    value = doc.get(key, {})
    if not isinstance(value, dict) or (required and not value):
        raise ValueError(f"[{key}] must be a table" + (" with at least one entry" if required
                                                       else ""))
    return value


def _shape(name: str, spec: Any) -> GuestShape:
    if not isinstance(spec, dict):
        raise ValueError(f"shapes.{name} must be a table, e.g. {{ vcpus = 2, memory = '1G' }}")
    unknown = set(spec) - {"vcpus", "memory", "touch", "host_shares"}
    if unknown:
        raise ValueError(f"shapes.{name}: unknown key(s) {', '.join(sorted(unknown))}")
    return GuestShape(vcpus=int(spec.get("vcpus", 1)),
                      memory_bytes=parse_size(spec.get("memory", "1G")),
                      touched_bytes=parse_size(spec.get("touch", 0)),
                      host_shared_pages=int(spec.get("host_shares", 0)))


# --------------------------------------------------------------------------------------------
# One point (runs on a Dask worker)
# --------------------------------------------------------------------------------------------


def run_point(point: Point) -> Row:
    """The point's row: its columns plus its run's figures, or its `error` (never raises)."""
    row = point.row()
    try:
        figures = RUNNERS[point.run](point)
        row.update((key, figures[key]) for key in RESULT_COLUMNS if key in figures)
    except Exception as error:  # a failed point is a row with its error, not a lost one
        row["error"] = f"{type(error).__name__}: {error}"
    return row


def _run_reserve(point: Point) -> Row:
    from pkvm_sim.core.reservation import compute_reservation

    return compute_reservation(point.sim_config()).to_json_dict()


def _run_capacity(point: Point) -> Row:
    assert point.shape is not None
    options = dict(point.options)
    result = capacity(point.sim_config(), point.shape, max_vms=options.get("max_vms"))
    return result.as_dict()


def _run_vm_lifecycle(point: Point) -> Row:
    """`scenario vm-lifecycle` on the point's machine: the VM limit (None: none up to its
    cap). Its machine knobs are the point's (the scenario's own defaults do not apply)."""
    try:
        lifecycle = importlib.import_module("pkvm_sim.tools.lifecycle")
    except ImportError:
        raise NotImplementedError("this build has no scenario vm-lifecycle") from None
    result = lifecycle.run_vm_lifecycle(point.sim_config())
    return {"vm_limit": result.vm_limit}


def _run_mmio_pressure(point: Point) -> Row:
    from .scenario import build_config, run_mmio_pressure

    options = dict(point.options)
    args = argparse.Namespace(
        page_size=point.page_size, memblock=list(point.memblocks),
        ram_fragments=int(options.get("ram_fragments", 1)), hole=str(options.get("hole", "1M")),
        ia_bits=int(dict(point.config).get("ia_bits", SimConfig().ia_bits)))
    spans = [int(float(s[:-1]) * GIB) if str(s).endswith(("G", "g")) and "." in str(s)
             else parse_size(s) for s in options.get("spans", DEFAULT_MMIO_SPANS)]
    assert point.seed is not None
    result = run_mmio_pressure(build_config(args, point.profile), spans,
                               int(options.get("faults_per_span", MMIO_FAULTS_PER_SPAN)),
                               point.seed)
    return result.as_dict()


RUNNERS: dict[str, Callable[[Point], Row]] = {
    "reserve": _run_reserve,
    "capacity": _run_capacity,
    "vm-lifecycle": _run_vm_lifecycle,
    "mmio-pressure": _run_mmio_pressure,
}


# --------------------------------------------------------------------------------------------
# Running many points: in process or on Dask
# --------------------------------------------------------------------------------------------


class Progress:
    """One status line on `stream`: done, failed, left and the time to go (from the mean
    time per point so far). On a terminal it redraws in place; elsewhere it prints a line
    at most every `interval_s` seconds, and always the last one."""

    def __init__(self, total: int, stream: IO[str] | None, interval_s: float = 2.0) -> None:
        self.total, self.stream, self.interval_s = total, stream, interval_s
        self.done = self.failed = 0
        self.started = time.monotonic()
        self._printed = 0.0
        self._first_done = self.started
        self.tty = stream is not None and stream.isatty()

    def update(self, row: Row) -> None:
        now = time.monotonic()
        if not self.done:
            self._first_done = now  # the rate is measured from here: start-up excluded
        self.done += 1
        self.failed += row.get("error") is not None
        if self.stream is None:
            return
        if self.tty or self.done == self.total or now - self._printed >= self.interval_s:
            self._printed = now
            self.stream.write(("\r" if self.tty else "") + self.line(now)
                              + ("" if self.tty else "\n"))
            self.stream.flush()

    def line(self, now: float) -> str:
        elapsed = now - self.started
        left = self.total - self.done
        width = 30
        filled = width * self.done // max(self.total, 1)
        if self.done >= 2 and now > self._first_done:
            to_go = _clock((now - self._first_done) / (self.done - 1) * left)
        else:
            to_go = "0:00:00" if not left else "?"
        return (f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} done,"
                f" {self.failed} failed, {left} left, {to_go} to go, {_clock(elapsed)} so far")

    def close(self) -> None:
        if self.tty and self.stream is not None:
            self.stream.write("\n")
            self.stream.flush()


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def run_in_process(points: Sequence[Point], on_row: Callable[[Row], None],
                   rows: list[Row], stop: threading.Event | None = None) -> list[Row]:
    """Each point in turn, here; finished rows are appended to `rows` as they come. Once
    `stop` is set, KeyboardInterrupt is raised before the next point."""
    for point in points:
        if stop is not None and stop.is_set():
            raise KeyboardInterrupt
        row = run_point(point)
        rows.append(row)
        on_row(row)
    return rows


def run_on_dask(points: Sequence[Point], scheduler: str | None, workers: int,
                on_row: Callable[[Row], None], rows: list[Row], *,
                wait_workers: int = 0) -> list[Row]:
    """Each point a task; `scheduler` None: a LocalCluster of `workers` single-threaded
    processes, else the address of a running scheduler (first waiting, up to
    WAIT_WORKERS_S, for `wait_workers` workers to join it). Finished rows are appended to
    `rows` as they come (so the caller keeps them if this is interrupted)."""
    try:  # untyped: bound as Any
        distributed: Any = importlib.import_module("distributed")
    except ImportError as error:
        raise SweepSetupError("sweep on Dask needs the sweep extra: pip install "
                              "'pkvm-sim[sweep]' (or --scheduler none)") from error
    cluster = local_cluster(workers) if scheduler is None else None
    try:
        client = distributed.Client(cluster if cluster is not None else scheduler,
                                    timeout=CONNECT_S)
    except OSError as error:
        if cluster is not None:
            cluster.close()
        raise SweepSetupError(f"cannot reach the Dask scheduler {scheduler}: {error}") from None
    try:
        if wait_workers:
            try:
                client.wait_for_workers(wait_workers, timeout=WAIT_WORKERS_S)
            except TimeoutError as error:
                raise SweepSetupError(f"fewer than {wait_workers} workers joined {scheduler}"
                                      f" within {WAIT_WORKERS_S:.0f} s") from error
        run_with_client(client, points, on_row, rows)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return rows


# Worker settings for CPU-bound pure-Python tasks. A worker's own threads take the GIL from
# the task's thread: the statistical profiler samples every 10 ms and the event loop ticks
# every 20 ms; with them, a point took 2 to 3 times its CPU time in wall time (probe on this
# project's machine). Set on workers the sweep starts; for a cluster of yours, the same in
# the environment (deploy/docker-compose.sweep.yml does): DASK_DISTRIBUTED__WORKER__PROFILE__
# ENABLED=False, DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL=1s,
# DASK_DISTRIBUTED__ADMIN__SYSTEM_MONITOR__INTERVAL=2s.
WORKER_CONFIG = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "1s",
    "distributed.admin.system-monitor.interval": "2s",
}


def local_cluster(workers: int) -> Any:
    """A `distributed.LocalCluster` of `workers` single-threaded worker processes, with
    WORKER_CONFIG (the nannies hand the configuration to the processes they start)."""
    distributed: Any = importlib.import_module("distributed")
    dask: Any = importlib.import_module("dask")
    with dask.config.set(WORKER_CONFIG):
        return distributed.LocalCluster(n_workers=workers, threads_per_worker=1,
                                        processes=True, dashboard_address=None,
                                        silence_logs=logging.ERROR)


def run_with_client(client: Any, points: Sequence[Point], on_row: Callable[[Row], None],
                    rows: list[Row]) -> list[Row]:
    """Submit every point to a connected `distributed.Client`; rows appended as they finish."""
    distributed: Any = importlib.import_module("distributed")
    # pure=False: no deduplication by content; every point is its own task, keyed by index.
    # The longest points first (priority), so that no worker is left with a long one at the end.
    futures = [client.submit(run_point, point, key=f"point-{point.index}", pure=False,
                             priority=point.cost_estimate())
               for point in points]
    by_key = {future.key: point for future, point in zip(futures, points, strict=True)}
    for future in distributed.as_completed(futures):
        row = _row_of(future, by_key[future.key])
        rows.append(row)
        on_row(row)
    return rows


def _row_of(future: Any, point: Point) -> Row:
    """The task's row, or the point's row with the error that lost it (a worker died)."""
    try:
        row: Row = future.result()
    except Exception as error:
        row = point.row()
        row["error"] = f"{type(error).__name__}: {error}"
    return row


class SweepSetupError(RuntimeError):
    """The sweep cannot start (no Dask, no scheduler)."""


def default_workers() -> int:
    return os.cpu_count() or 1


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def write_rows(rows: Sequence[Row], out: str | Path) -> Path:
    """Rows by point index, to .parquet (pyarrow) or .csv (None as an empty cell)."""
    path = Path(out)
    ordered = sorted(rows, key=lambda r: int(r["point"]))
    if path.suffix == ".parquet":
        try:  # untyped: bound as Any
            pa: Any = importlib.import_module("pyarrow")
            pq: Any = importlib.import_module("pyarrow.parquet")
        except ImportError as error:
            raise SweepSetupError("parquet output needs pyarrow: pip install "
                                  "'pkvm-sim[sweep]' (or --out FILE.csv)") from error
        table = pa.Table.from_pylist([{c: r.get(c) for c in COLUMNS} for r in ordered],
                                     schema=_arrow_schema(pa))
        pq.write_table(table, path)
    else:
        with path.open("w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(ordered)
    return path


LINE_STYLES = ("-", "--", ":", "-.")
_STRING_COLUMNS = {"run", "profile", "machine", "shape", "error", "binding_limit", "reason"}


def _arrow_schema(pa: Any) -> Any:
    return pa.schema([(c, pa.string() if c in _STRING_COLUMNS else pa.int64())
                      for c in COLUMNS])


def read_rows(path: str | Path) -> list[Row]:
    """Rows back from a file `write_rows` wrote, with the same Python types."""
    path = Path(path)
    if path.suffix == ".parquet":
        pq: Any = importlib.import_module("pyarrow.parquet")
        return list(pq.read_table(path).to_pylist())
    with path.open(newline="") as stream:
        return [{c: _from_cell(c, v) for c, v in r.items()} for r in csv.DictReader(stream)]


def _from_cell(column: str, value: str) -> Any:
    if value == "":
        return None
    return value if column in _STRING_COLUMNS else int(value)


def plot_sweep(rows: Sequence[Row], out: str | Path) -> Path:
    """Guests carried against RAM, one line per profile (and page size), one panel per guest
    shape: the capacity rows of a sweep."""
    from .plots import _pyplot, _save, check_output

    path = check_output(out)
    points = [r for r in rows if r["run"] == "capacity" and r["error"] is None]
    if not points:
        raise ValueError("--plot draws capacity rows: the sweep has none that succeeded")
    shapes = sorted({r["shape"] for r in points})
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.5 * len(shapes), 4.5), squeeze=False)
    for ax, shape in zip(axes[0], shapes, strict=True):
        lines: dict[tuple[str, int], list[Row]] = {}
        for r in points:
            if r["shape"] == shape:
                lines.setdefault((r["profile"], r["page_size"]), []).append(r)
        page_sizes = sorted({page_size for _profile, page_size in lines})
        for (profile, page_size), line_rows in sorted(lines.items()):
            line_rows.sort(key=lambda r: r["memory_bytes"])
            label = profile if len(page_sizes) == 1 else f"{profile} {page_size // 1024}K"
            # one line style per page size: lines that coincide stay visible
            style = LINE_STYLES[page_sizes.index(page_size) % len(LINE_STYLES)]
            ax.plot([r["memory_bytes"] / GIB for r in line_rows], [r["vms"] for r in line_rows],
                    marker="o", linestyle=style, label=label)
        machines = {r["memory_bytes"]: r["machine"] for r in points if r["shape"] == shape}
        for memory, machine in machines.items():
            ax.annotate(machine, (memory / GIB, 0), xycoords=("data", "axes fraction"),
                        textcoords="offset points", xytext=(0, 4), ha="center", fontsize=8,
                        color="#555555")
        first = next(r for r in points if r["shape"] == shape)
        ax.set_title(f"{shape}: {first['vcpus']} vCPU,"
                     f" {size_label(first['guest_memory_bytes'])} guests")
        ax.set_xlabel("host RAM (GiB)")
        ax.set_ylabel("guests carried")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("pkvm-sim sweep: guests carried against RAM")
    return _save(fig, path)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__.split("\n\n")[0]
    parser.epilog = __doc__.split("\n\n", 2)[2]  # grids, points, rows, the extra
    parser.add_argument("grid", metavar="GRID.toml", help="the grid (see examples/sweep.toml)")
    parser.add_argument("--out", required=True, metavar="FILE.parquet|FILE.csv",
                        help="where the rows go, one per point")
    parser.add_argument("--scheduler", default=None, metavar="tcp://HOST:PORT|none",
                        help="an existing Dask scheduler; 'none' runs in this process"
                        " (default: a local Dask cluster of --workers processes)")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="local cluster worker processes (default: the CPU count)")
    parser.add_argument("--wait-workers", type=int, default=0, metavar="N",
                        help="with --scheduler tcp://...: wait until N workers have joined"
                        f" (at most {WAIT_WORKERS_S:.0f} s) before submitting")
    parser.add_argument("--plot", metavar="FILE.png|FILE.svg",
                        help="also draw guests carried against RAM from the capacity rows")
    parser.add_argument("--quiet", action="store_true", help="no progress line")


@contextlib.contextmanager
def ctrl_c_between_points() -> Iterator[threading.Event]:
    """An event set by Ctrl-C (SIGINT) instead of a KeyboardInterrupt raised wherever the
    interpreter happens to be, for an in-process run to stop between two points. Ctrl-C
    once aborted an in-process sweep (SIGABRT, "fatal: out of memory" from mypyc's runtime,
    with a 28 MiB process), most likely a KeyboardInterrupt surfacing inside the compiled
    core; between two points none of it is running. Outside the main thread, or where SIGINT
    is not Python's default handler (ignored in a background job, or handled by the
    caller), nothing changes."""
    pressed = threading.Event()
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield pressed
        return
    previous = signal.signal(signal.SIGINT, lambda _signum, _frame: pressed.set())
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, previous)


def run(args: argparse.Namespace) -> int:
    try:
        grid = load_grid(args.grid)
        if Path(args.out).suffix not in (".parquet", ".csv"):
            raise ValueError(f"--out {args.out}: the name must end in .parquet or .csv")
        if args.workers is not None and args.workers < 1:
            raise ValueError(f"--workers must be >= 1, not {args.workers}")
        if args.plot:
            from .plots import check_output

            check_output(args.plot)
    except ValueError as error:
        print(f"sweep: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    points = grid.points()
    progress = Progress(len(points), None if args.quiet else sys.stderr)
    rows: list[Row] = []
    interrupted = False
    try:
        if args.scheduler == "none":
            with ctrl_c_between_points() as pressed:
                run_in_process(points, progress.update, rows, pressed)
        else:
            run_on_dask(points, args.scheduler, args.workers or default_workers(),
                        progress.update, rows, wait_workers=args.wait_workers)
    except KeyboardInterrupt:
        interrupted = True
    except (SweepSetupError, OSError) as error:
        progress.close()
        print(f"sweep: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    progress.close()
    return _finish(args, points, rows, interrupted)


def _finish(args: argparse.Namespace, points: Sequence[Point], rows: list[Row],
            interrupted: bool) -> int:
    unique = {int(r["point"]): r for r in rows}
    rows = list(unique.values())
    try:
        write_rows(rows, args.out)
    except SweepSetupError as error:
        print(f"sweep: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    failed = sum(r["error"] is not None for r in rows)
    print(f"sweep: {len(rows)} of {len(points)} points written to {args.out}"
          f" ({failed} failed)", file=sys.stderr)
    if interrupted:
        print(f"sweep: interrupted: {len(points) - len(rows)} points missing", file=sys.stderr)
        return EXIT_INTERRUPTED
    if args.plot:
        try:
            plot_sweep(rows, args.plot)
        except ValueError as error:
            print(f"sweep: error: {error}", file=sys.stderr)
            return EXIT_USAGE
    return EXIT_FAILED_POINTS if failed else EXIT_OK


__all__ = ["COLUMNS", "Grid", "Point", "add_arguments", "load_grid", "parse_grid",
           "plot_sweep", "read_rows", "run", "run_in_process", "run_on_dask", "run_point",
           "write_rows"]
