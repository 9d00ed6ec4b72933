"""`pkvm-sim sweep`: grids of independent simulator runs, in process and on real Dask clusters
(a LocalCluster of 2 worker processes; `dask scheduler` + 2 `dask worker` processes on
127.0.0.1). The rows of a grid must be the same whoever runs it."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pkvm_sim.tools import sweep
from pkvm_sim.tools.sweep import COLUMNS, Progress, load_grid, parse_grid, read_rows, run_point

from tests.unavailable import unavailable

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "sweep.toml"
DEADLINE_S = 240.0
VENV_BIN = Path(sys.executable).parent

# 4 reserve points (2 profiles x 2 machines), 8 capacity (x 2 shapes), 8 mmio-pressure
# (x 2 seeds): 20 points.
SMALL_GRID = """
runs = ["reserve", "capacity", "mmio-pressure"]
profiles = ["v6.1", "v6.12"]
page_sizes = ["4K"]
seeds = [1, 2]
[machines]
a = ["0x40000000:4G"]
b = ["0x40000000:1G", "0x880000000:7G"]
[shapes]
tiny = { vcpus = 1, memory = "12M" }
big = { vcpus = 2, memory = "1G", host_shares = 2 }
[mmio-pressure]
spans = ["0.5G"]
faults_per_span = 50
ram_fragments = 2
"""


def small_grid(tmp_path: Path) -> Path:
    path = tmp_path / "grid.toml"
    path.write_text(SMALL_GRID)
    return path


def sweep_cli(*argv: str, timeout: float = DEADLINE_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pkvm_sim.cli", "sweep", *argv],
                          capture_output=True, text=True, timeout=timeout)


def in_process_rows(grid: Path) -> list[dict[str, Any]]:
    return [run_point(point) for point in load_grid(grid).points()]


@pytest.fixture(scope="module")
def small_grid_rows(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The small grid's rows, run in process once for the module (seconds of simulation);
    each test reads them without changing them."""
    return in_process_rows(small_grid(tmp_path_factory.mktemp("grid")))


# -- the grid -------------------------------------------------------------------------------


def test_points_multiply_only_the_dimensions_a_run_uses(tmp_path: Path) -> None:
    points = load_grid(small_grid(tmp_path)).points()
    by_run = {run: sum(p.run == run for p in points) for run in sweep.RUNS}
    assert by_run == {"reserve": 4, "capacity": 8, "mmio-pressure": 8, "vm-lifecycle": 0}
    assert [p.index for p in points] == list(range(20))
    assert {p.shape_name for p in points if p.run == "capacity"} == {"tiny", "big"}
    assert {p.seed for p in points if p.run == "mmio-pressure"} == {1, 2}


def test_the_example_grid_has_a_few_dozen_points() -> None:
    points = load_grid(EXAMPLE).points()
    # 2 profiles x 2 page sizes x 3 machines = 12 per run, x 2 shapes, x 2 seeds.
    assert len(points) == 12 + 24 + 24


@pytest.mark.parametrize(("text", "needle"), [
    ('runs = ["reserve"]\nprofiles = ["v9.9"]\n[machines]\na = ["0x0:1G"]', "v9.9"),
    ('runs = ["dance"]\n[machines]\na = ["0x0:1G"]', "runs"),
    ('runs = ["capacity"]\n[machines]\na = ["0x40000000:1G"]', "shape"),
    ('runs = ["reserve"]\n[machines]\na = ["0x40000000"]', "BASE:SIZE"),
    ('runs = ["reserve"]\n[machine]\na = ["0x40000000:1G"]', "machine"),
    ('runs = ["reserve"]\n', "machines"),
    ('runs = ["reserve"]\npage_sizes = ["8K"]\n[machines]\na = ["0x40000000:1G"]', "8K"),
])
def test_bad_grids_are_refused_by_name(text: str, needle: str) -> None:
    import tomllib

    with pytest.raises(ValueError, match=needle):
        parse_grid(tomllib.loads(text))


def test_bad_grid_file_exits_2(tmp_path: Path) -> None:
    grid = tmp_path / "grid.toml"
    grid.write_text('runs = ["reserve"]\n[machines]\na = ["0x40000000:1Q"]\n')
    done = sweep_cli(str(grid), "--out", str(tmp_path / "rows.csv"), "--scheduler", "none")
    assert done.returncode == 2 and done.stderr.startswith("sweep: error:")
    assert not (tmp_path / "rows.csv").exists()


# -- points and rows ----------------------------------------------------------------------


def test_every_row_has_every_column_and_its_runs_figures(
        small_grid_rows: list[dict[str, Any]]) -> None:
    rows = small_grid_rows
    assert all(list(row) == list(COLUMNS) for row in rows)
    assert all(row["error"] is None for row in rows)
    reserve = next(r for r in rows if r["run"] == "reserve")
    assert reserve["reserved_bytes"] > 0 and reserve["vms"] is None
    tiny = [r for r in rows if r["run"] == "capacity" and r["shape"] == "tiny"]
    # 12 MiB guests: 4 GiB holds about 340, so v6.12's 255-entry VM table binds on both
    # machines; v6.1 has no table and carries what host RAM outside the carve-out holds.
    v612 = [r for r in tiny if r["profile"] == "v6.12"]
    assert {(r["vms"], r["binding_limit"]) for r in v612} == {(255, "vm-table")}
    v61 = {r["machine"]: r for r in tiny if r["profile"] == "v6.1"}
    assert {r["binding_limit"] for r in v61.values()} == {"host-ram"}
    assert 255 < v61["a"]["vms"] < 4 * 1024 // 12 < v61["b"]["vms"] < 8 * 1024 // 12
    mmio = [r for r in rows if r["run"] == "mmio-pressure"]
    assert all(r["mmio_faults"] == 50 for r in mmio)


def test_a_failed_point_is_a_row_with_its_error(tmp_path: Path) -> None:
    # The second machine has RAM too small for the carve-out: its points fail, the rest not.
    grid = tmp_path / "grid.toml"
    grid.write_text('runs = ["reserve"]\nprofiles = ["v6.12"]\n[machines]\n'
                    'ok = ["0x40000000:1G"]\nbroken = ["0x40000000:64K"]\n')
    out = tmp_path / "rows.csv"
    done = sweep_cli(str(grid), "--out", str(out), "--scheduler", "none")
    assert done.returncode == 1, done.stderr
    rows = read_rows(out)
    assert [r["machine"] for r in rows] == ["ok", "broken"]
    assert rows[0]["error"] is None and rows[0]["reserved_bytes"] > 0
    assert rows[1]["error"] and rows[1]["reserved_bytes"] is None
    assert "1 failed" in done.stderr


def test_csv_and_parquet_hold_the_same_rows(small_grid_rows: list[dict[str, Any]],
                                           tmp_path: Path) -> None:
    rows = small_grid_rows
    shuffled = rows[::-1]  # written by point index whatever the order they finished in
    sweep.write_rows(shuffled, tmp_path / "rows.csv")
    sweep.write_rows(shuffled, tmp_path / "rows.parquet")
    assert read_rows(tmp_path / "rows.csv") == rows
    assert read_rows(tmp_path / "rows.parquet") == rows


def test_progress_says_done_failed_left_and_time_to_go() -> None:
    stream = io.StringIO()
    progress = Progress(4, stream, interval_s=0.0)
    progress.update({"error": None})
    progress.update({"error": "ValueError: no"})
    last = stream.getvalue().splitlines()[-1]
    assert "2/4 done, 1 failed, 2 left" in last
    assert " to go" in last and "?" not in last  # two points done: a rate exists


def test_in_process_sweep_writes_rows_and_plot(small_grid_rows: list[dict[str, Any]],
                                               tmp_path: Path) -> None:
    out, picture = tmp_path / "rows.parquet", tmp_path / "sweep.png"
    done = sweep_cli(str(small_grid(tmp_path)), "--out", str(out), "--scheduler", "none",
                     "--plot", str(picture))
    assert done.returncode == 0, done.stderr
    assert read_rows(out) == small_grid_rows
    assert "20/20 done, 0 failed, 0 left" in done.stderr
    assert picture.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("where", [
    pytest.param(["--scheduler", "none"], id="in-process"),
    pytest.param(["--workers", "2"], id="local-cluster", marks=pytest.mark.cluster),
])
def test_ctrl_c_keeps_finished_rows_and_says_how_many_are_missing(tmp_path: Path,
                                                                  where: list[str]) -> None:
    if "--workers" in where:
        require_dask()
    grid = tmp_path / "grid.toml"
    # 40 capacity points of ~250 small guests each: the signal comes after the first.
    machines = "\n".join(f'm{i} = ["0x40000000:4G"]' for i in range(40))
    grid.write_text('runs = ["capacity"]\nprofiles = ["v6.1"]\n[shapes]\n'
                    f's = {{ vcpus = 1, memory = "16M" }}\n[machines]\n{machines}\n')
    out = tmp_path / "rows.csv"
    # A shell without job control starts background jobs with SIGINT ignored, and Python then
    # keeps it ignored: give the sweep the disposition a terminal's Ctrl-C finds.
    proc = subprocess.Popen(
        [sys.executable, "-m", "pkvm_sim.cli", "sweep", str(grid), "--out", str(out), *where],
        stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()  # printed when the first point is done
        assert "1/40 done" in first, first
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=DEADLINE_S)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    rows = read_rows(out)
    assert 1 <= len(rows) < 40
    assert f"{40 - len(rows)} points missing" in err
    assert all(r["error"] is None and r["vms"] for r in rows)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# -- on real Dask clusters --------------------------------------------------------------


def require_dask() -> None:
    try:
        import distributed  # noqa: F401
    except ImportError:
        unavailable("dask.distributed is not installed (pip install 'pkvm-sim[sweep]')")


@pytest.mark.cluster
def test_a_local_cluster_of_two_workers_gives_the_in_process_rows(
        small_grid_rows: list[dict[str, Any]], tmp_path: Path) -> None:
    require_dask()
    out = tmp_path / "rows.csv"
    done = sweep_cli(str(small_grid(tmp_path)), "--out", str(out), "--workers", "2")
    assert done.returncode == 0, done.stderr
    assert read_rows(out) == small_grid_rows


@pytest.fixture
def dask_cluster(tmp_path: Path) -> Iterator[str]:
    """`dask scheduler` and two `dask worker` processes on 127.0.0.1; yields the address."""
    require_dask()
    dask = VENV_BIN / "dask"
    if not dask.exists():
        unavailable("the dask command is not installed")
    scheduler_file = tmp_path / "scheduler.json"
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    procs = [subprocess.Popen(
        [str(dask), "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
         "--scheduler-file", str(scheduler_file)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)]
    try:
        deadline = time.monotonic() + DEADLINE_S
        while not scheduler_file.exists() or not scheduler_file.read_text().strip():
            assert time.monotonic() < deadline, "the scheduler wrote no scheduler file"
            assert procs[0].poll() is None, "dask scheduler exited"
            time.sleep(0.2)
        address = json.loads(scheduler_file.read_text())["address"]
        assert address.startswith("tcp://127.0.0.1:")
        procs += [subprocess.Popen(
            [str(dask), "worker", address, "--nworkers", "1", "--nthreads", "1",
             "--host", "127.0.0.1", "--no-dashboard", "--name", f"w{i}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env) for i in range(2)]
        from distributed import Client

        with Client(address, timeout=DEADLINE_S) as client:
            client.wait_for_workers(2, timeout=DEADLINE_S)
        yield address
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in reversed(procs):
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.mark.cluster
def test_dask_scheduler_and_workers_give_the_in_process_rows(
        small_grid_rows: list[dict[str, Any]], tmp_path: Path, dask_cluster: str) -> None:
    out = tmp_path / "rows.parquet"
    done = sweep_cli(str(small_grid(tmp_path)), "--out", str(out), "--scheduler", dask_cluster)
    assert done.returncode == 0, done.stderr
    assert read_rows(out) == small_grid_rows
    from distributed import Client

    with Client(dask_cluster, timeout=DEADLINE_S) as client:
        workers = client.scheduler_info()["workers"].values()
        # the cluster is the two `dask worker` processes (the sweep brought none of its own)
        assert len(workers) == 2


@pytest.mark.parametrize("argv", [
    ["capacity", "--memblock", "0x40000000:1G", "--max-vms", "2", "--json"],
    ["sweep", "{grid}", "--scheduler", "none", "--quiet", "--out", "{out}"],
])
def test_offline_runs_load_neither_grpc_nor_dask(argv: list[str], tmp_path: Path) -> None:
    """capacity and an in-process sweep need neither the service's gRPC nor Dask."""
    grid = tmp_path / "grid.toml"
    grid.write_text('runs = ["reserve", "capacity"]\n[machines]\nm = ["0x40000000:1G"]\n'
                    '[shapes]\ns = { vcpus = 1, memory = "256M" }\n')
    argv = [a.replace("{out}", str(tmp_path / "rows.csv")).replace("{grid}", str(grid))
            for a in argv]
    code = (f"import sys; from pkvm_sim.cli import main; main({argv!r}); "
            "print('grpc' in sys.modules, 'distributed' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=DEADLINE_S).stdout
    assert out.strip().splitlines()[-1] == "False False"


def test_vm_lifecycle_rows_agree_with_capacity(tmp_path: Path) -> None:
    """The VM limit vm-lifecycle reports and the 1-vCPU guests capacity carries are the same
    count on the same machine (v6.12: the 255-entry table); a build without vm-lifecycle
    gives rows with the error, not lost rows."""
    import importlib.util

    grid = tmp_path / "grid.toml"
    grid.write_text('runs = ["vm-lifecycle", "capacity"]\nprofiles = ["v6.12"]\n'
                    '[machines]\nm = ["0x40000000:4G"]\n'
                    '[shapes]\none = { vcpus = 1, memory = "4K" }\n'
                    '[config]\nia_bits = 48\nnr_cpus = 1\n')
    lifecycle_row, capacity_row = in_process_rows(grid)
    assert capacity_row["vms"] == 255 and capacity_row["binding_limit"] == "vm-table"
    if importlib.util.find_spec("pkvm_sim.tools.lifecycle") is None:
        assert "vm-lifecycle" in lifecycle_row["error"]
    else:
        assert lifecycle_row["error"] is None
        assert lifecycle_row["vm_limit"] == capacity_row["vms"]
