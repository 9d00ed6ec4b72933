"""`pkvm-sim serve --state-file` as a real process: SIGTERM/SIGINT round trips, refusals."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from pkvm_client import Hypervisor
from pkvm_sim.core import state_file
from pkvm_sim.core.config import SimConfig
from pkvm_sim.core.hypervisor import Hypervisor as CoreHypervisor
from pkvm_sim.core.state_file import FORMAT_VERSION, HEADER, MAGIC

READY = re.compile(r"^pkvm-sim listening on 127\.0\.0\.1:(\d+)$")
SERVE = [sys.executable, "-m", "pkvm_sim.cli", "serve", "--listen", "127.0.0.1:0",
         "--metrics-listen", "off", "--grace-seconds", "2"]
ENV = {k: v for k, v in os.environ.items() if not k.startswith("PKVM_SIM_")}


class Server:
    def __init__(self, path: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            [*SERVE, "--state-file", str(path), *extra], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env=env or ENV,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        match = READY.match(line)
        if match is None:
            self.process.kill()
            _out, err = self.process.communicate()
            raise AssertionError(f"bad ready line {line!r}; stderr: {err}")
        self.target = f"127.0.0.1:{match.group(1)}"

    def stop(self, signum: int = signal.SIGTERM) -> tuple[int, str]:
        self.process.send_signal(signum)
        _out, err = self.process.communicate(timeout=30)
        return self.process.returncode, err

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_machine_survives_a_restart(tmp_path: Path, signum: int) -> None:
    path = tmp_path / "machine.pkvm"
    server = Server(path, "--memblock", "0x80000000:1G")
    try:
        with Hypervisor(server.target) as hv:
            first_id = hv.instance_id()
            vm = hv.create_vm(nr_vcpus=2, slice_pages=64)
            base = vm.info.slice_base_pfn
            block = vm.alloc_pages(order=1)
            vm.get_page(block)
            vm.host_share(base, 3)
            vm.pin_shared(base, 1)
            vm.topup_memcache(3)
            vm.guest_map(0x4000_0000, base + 10)
            hv.map_mmio(0x1000_0000)
            stats = hv.stats()
            pages = [hv.page_info(base + i) for i in range(12)]
        code, err = server.stop(signum)
    finally:
        server.kill()
    assert code == 0 and "no state file" in err and "saved 1 VMs" in err, err
    assert path.stat().st_mode & 0o777 == 0o600

    again = Server(path)  # no --memblock: the file's configuration is kept
    try:
        with Hypervisor(again.target) as hv:
            assert hv.instance_id() != first_id
            restored = hv.stats()
            assert dataclasses.replace(restored, instance_id=stats.instance_id) == stats
            assert [hv.page_info(base + i) for i in range(12)] == pages
            same = hv.attach(vm.handle, vm.token)
            assert same.put_page(block) == 1 and same.put_page(block) == 0
            same.unpin_shared(base, 1)
            same.host_unshare(base, 3)
            assert hv.create_vm(slice_pages=4).handle == vm.handle + 1
        code, err = again.stop()
    finally:
        again.kill()
    assert code == 0 and "restored" in err and "1 GiB" in err and "saved 2 VMs" in err, err


def good_file(tmp_path: Path) -> bytes:
    hv = CoreHypervisor.boot(SimConfig.from_mapping({"memblocks": ["0x80000000:256M"]}))
    hv.create_vm(nr_vcpus=1, slice_pages=8)
    return state_file.encode(hv, {"tokens": [[0x1000, "t"]]})


def _future(data: bytes) -> bytes:
    payload = data[HEADER.size:]
    return HEADER.pack(MAGIC, FORMAT_VERSION + 1, 0, len(payload),
                       hashlib.sha256(payload).digest()) + payload


@pytest.mark.parametrize(("kind", "mangle", "says"), [
    ("corrupt", lambda d: d[:200] + bytes([d[200] ^ 1]) + d[201:], "corrupt"),
    ("truncated", lambda d: d[:-7], "truncated"),
    ("foreign", lambda d: b'{"this": "is json"}\n', "not a pkvm-sim state file"),
    ("future-version", _future, f"format version {FORMAT_VERSION + 1} is a newer"),
])
def test_a_bad_state_file_exits_2_with_one_line_and_is_left_untouched(
    tmp_path: Path, kind: str, mangle: object, says: str
) -> None:
    path = tmp_path / f"{kind}.pkvm"
    path.write_bytes(mangle(good_file(tmp_path)))  # type: ignore[operator]
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    result = subprocess.run([*SERVE, "--state-file", str(path)], capture_output=True,
                            text=True, timeout=60, env=ENV)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and str(path) in lines[0], result.stderr
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_an_explicit_setting_that_contradicts_the_file_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "m.pkvm"
    path.write_bytes(good_file(tmp_path))
    for extra, env in ((["--memblock", "0x80000000:512M"], ENV),
                       ([], {**ENV, "PKVM_SIM_PROFILE": "v5.13"})):
        result = subprocess.run([*SERVE, "--state-file", str(path), *extra],
                                capture_output=True, text=True, timeout=60, env=env)
        assert result.returncode == 2, result.stderr
        line = result.stderr.strip()
        assert "another configuration" in line and "\n" not in line
    agreeing = Server(path, "--memblock", "0x80000000:256M", "--profile", "v5.14")
    try:
        code, err = agreeing.stop()
    finally:
        agreeing.kill()
    assert code == 0 and "restored" in err


def test_a_state_file_in_a_missing_directory_exits_2(tmp_path: Path) -> None:
    result = subprocess.run([*SERVE, "--state-file", str(tmp_path / "nope" / "m.pkvm")],
                            capture_output=True, text=True, timeout=60, env=ENV)
    assert result.returncode == 2 and "does not exist" in result.stderr
