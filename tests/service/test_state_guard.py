"""`serve --state-file` guarding its file: one server per file, a directory that can take the
save, stale temporaries, header flags, the handle counter, huge foreign files, and the save
fitting inside --grace-seconds. Every test runs the real CLI as a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from pkvm_client import Batch, Hypervisor
from pkvm_sim.core import state_file
from pkvm_sim.core.state_file import HEADER

from tests.service.test_state_serve import ENV, SERVE, Server, good_file

RUSAGE_KIB = 1024  # ru_maxrss is in KiB on Linux


def serve_once(path: Path, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """A serve that must refuse at start (exit 2) rather than serve."""
    process = subprocess.Popen([*SERVE, "--state-file", str(path)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # it served instead of refusing
        process.kill()
        out, err = process.communicate()
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def assert_one_line_exit_2(result: subprocess.CompletedProcess[str], says: str) -> None:
    assert result.returncode == 2 and result.stdout == "", (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], result.stderr


def test_a_second_server_on_the_same_file_exits_2_and_the_first_keeps_its_vms(
    tmp_path: Path,
) -> None:
    path = tmp_path / "m.pkvm"
    first = Server(path, "--memblock", "0x80000000:512M")
    try:
        with Hypervisor(first.target) as hv:
            vm = hv.create_vm(slice_pages=8)
        second = serve_once(path)
        holder = f"in use by another pkvm-sim serve (pid {first.process.pid})"
        assert_one_line_exit_2(second, holder)
        code, err = first.stop()
    finally:
        first.kill()
    assert code == 0 and "saved 1 VMs" in err, err
    again = Server(path)  # the lock went with the first server
    try:
        with Hypervisor(again.target) as hv:
            assert hv.attach(vm.handle, vm.token).renew() >= 0
        code, err = again.stop()
    finally:
        again.kill()
    assert code == 0 and "restored" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pkvm"]  # no lock file left


def test_a_killed_server_does_not_keep_the_file_locked(tmp_path: Path) -> None:
    path = tmp_path / "m.pkvm"
    first = Server(path, "--memblock", "0x80000000:512M")
    first.kill()  # SIGKILL: no save, no cleanup; the kernel drops the lock
    again = Server(path, "--memblock", "0x80000000:512M")
    try:
        code, err = again.stop()
    finally:
        again.kill()
    assert code == 0 and "saved 0 VMs" in err, err


def read_only_serve(directory: Path) -> subprocess.CompletedProcess[str]:
    """serve --state-file in `directory` mounted read-only (a private mount namespace)."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) for a private read-only mount")
    command = " ".join([
        f"mount --bind {directory} {directory} &&",
        f"mount -o remount,bind,ro {directory} {directory} &&",
        "exec", *SERVE, "--state-file", str(directory / "m.pkvm"),
    ])
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True, check=False)
    if probe.returncode:
        pytest.skip("unprivileged mount namespaces are not available here")
    process = subprocess.Popen(["unshare", "-rm", "sh", "-c", command],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=ENV)
    try:
        out, err = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # it served: the loss would only show at exit
        process.kill()
        out, err = process.communicate()
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


@pytest.mark.parametrize("existing", [False, True], ids=["no-file-yet", "file-exists"])
def test_a_read_only_state_directory_exits_2_at_start(tmp_path: Path, existing: bool) -> None:
    directory = tmp_path / "ro"
    directory.mkdir()
    if existing:
        (directory / "m.pkvm").write_bytes(good_file(tmp_path))
    result = read_only_serve(directory)
    assert_one_line_exit_2(result, "cannot be saved")
    assert "Read-only file system" in result.stderr


def test_stale_temporary_files_are_removed_at_start(tmp_path: Path) -> None:
    path = tmp_path / "m.pkvm"
    path.write_bytes(good_file(tmp_path))
    stale = [tmp_path / ".m.pkvm.tmp-4242", tmp_path / ".m.pkvm.tmp-1"]
    for leftover in stale:
        leftover.write_bytes(b"half a save")
    other = tmp_path / ".other.pkvm.tmp-7"  # another file's temporary: not ours to remove
    other.write_bytes(b"x")
    server = Server(path)
    try:
        assert not any(leftover.exists() for leftover in stale)
        assert other.exists()
        code, err = server.stop()
    finally:
        server.kill()
    assert code == 0 and "removed" in err and ".m.pkvm.tmp-4242" in err


def test_unknown_header_flags_are_refused(tmp_path: Path) -> None:
    data = bytearray(good_file(tmp_path))
    data[12] |= 0x01  # flags (u32 at offset 12) are outside the checksum
    path = tmp_path / "flags.pkvm"
    path.write_bytes(bytes(data))
    assert_one_line_exit_2(serve_once(path), "unknown header flags 0x00000001")


def test_a_rechecksummed_file_with_a_lowered_handle_counter_is_refused(tmp_path: Path) -> None:
    decoded = state_file.decode(good_file(tmp_path))  # one VM, handle 0x1000
    machine = json.loads(json.dumps(decoded.machine))
    assert machine["vms_created"] == 1
    machine["vms_created"] = 0  # the next VM would get 0x1000 again
    forged = state_file.pack(state_file.Snapshot(machine, decoded.service, decoded.vmemmap,
                                                 decoded.ints))
    path = tmp_path / "forged.pkvm"
    path.write_bytes(forged)
    assert_one_line_exit_2(serve_once(path), "would give handle 0x1000 again")


def test_a_huge_foreign_file_is_refused_without_being_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "huge.pkvm"
    with open(path, "wb") as huge:
        huge.write(b"NOTPKVM!" + bytes(HEADER.size))
        huge.truncate(2 << 30)  # 2 GiB, sparse
    process = subprocess.Popen([*SERVE, "--state-file", str(path)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=ENV)
    assert process.stdout is not None and process.stderr is not None
    _pid, status, usage = os.wait4(process.pid, 0)  # this child's own peak memory
    err = process.stderr.read()
    process.returncode = os.waitstatus_to_exitcode(status)
    assert process.returncode == 2 and "not a pkvm-sim state file" in err, err
    assert usage.ru_maxrss * RUSAGE_KIB < (512 << 20), usage.ru_maxrss


def test_the_save_fits_inside_the_grace_period(tmp_path: Path) -> None:
    """A supervisor sends SIGTERM and SIGKILLs after --grace-seconds: the file must be
    saved by then, even with a stream that keeps the server busy until the grace ends."""
    path = tmp_path / "m.pkvm"
    grace = 6.0
    server = Server(path, "--memblock", "0x80000000:2G", "--grace-seconds", str(grace))
    try:
        with Hypervisor(server.target) as hv:
            vms = [hv.create_vm(slice_pages=16) for _ in range(3)]
            hv.save_state()  # the server learns how long a save takes here
            busy = vms[0].stream()  # an idle Execute stream lasts until the grace runs out
            batch = Batch()
            batch.alloc_pages(0)
            assert busy.execute(batch).completed == 1  # the stream is open on the server
            server.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace
            while server.process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if server.process.poll() is None:
                server.process.kill()  # what the supervisor does
            _out, err = server.process.communicate(timeout=30)
    finally:
        server.kill()
    assert server.process.returncode == 0 and "saved 3 VMs" in err, err
