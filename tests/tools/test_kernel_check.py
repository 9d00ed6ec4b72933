"""`pkvm-sim kernel-check` without QEMU: memory maps, the QEMU command, the cache manifest and
usage errors. (tests/kernel boots the real kernels.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pkvm_sim.cli import main
from pkvm_sim.core.config import Memblock
from pkvm_sim.tools.kernel_check import (
    CheckRow,
    KernelImage,
    MemoryMap,
    load_manifest,
    qemu_command,
    render_json,
    render_table,
    simulated_reserved_bytes,
)

GIB, MIB = 1 << 30, 1 << 20


def test_numa_nodes_are_consecutive_memblocks_from_the_virt_ram_base() -> None:
    memory = MemoryMap.parse("64M+9600M")
    assert memory.name == "64M+9600M"
    assert memory.memblocks() == (Memblock(0x4000_0000, 64 * MIB),
                                  Memblock(0x4400_0000, 9600 * MIB))
    assert memory.memblock_flags() == ["--memblock=0x40000000:64M",
                                       "--memblock=0x44000000:9600M"]


@pytest.mark.parametrize("text", ["", "0", "4G+", "3M", "x"])
def test_bad_memory_maps_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        MemoryMap.parse(text)


def test_qemu_command(tmp_path: Path) -> None:
    kernel = KernelImage("6.12-4k", "v6.12", "4K", "linux-image-x", "1", tmp_path / "Image")
    small = qemu_command(kernel, MemoryMap.parse("4G"), tmp_path)
    assert small[small.index("-m") + 1] == "4G"
    assert "kvm-arm.mode=protected" in small[small.index("-append") + 1]
    assert "virtualization=on" in small[small.index("-M") + 1]
    assert "-numa" not in small
    numa = qemu_command(kernel, MemoryMap.parse("2G+2G+4G"), tmp_path)
    assert numa.count("-numa") == 3 and numa[numa.index("-m") + 1] == "8G"
    big = " ".join(qemu_command(kernel, MemoryMap.parse("64G"), tmp_path))
    assert "memory-backend-file" in big and "memory-backend=m0" in big  # sparse file backing


def test_manifest_lists_only_kernels_whose_image_exists(tmp_path: Path) -> None:
    (tmp_path / "Image").write_bytes(b"x")
    (tmp_path / "kernels.tsv").write_text(
        f"6.1-4k\tv6.1\t4K\tlinux-image-6.1.0-50-arm64\t6.1.176-1\t{tmp_path / 'Image'}\n"
        f"6.12-4k\tv6.12\t4K\tlinux-image-y\t6.12.117-1\t{tmp_path / 'missing'}\n"
    )
    kernels = load_manifest(tmp_path)
    assert [(k.flavour, k.version) for k in kernels] == [("6.1-4k", "6.1.176-1")]
    assert load_manifest(tmp_path / "nowhere") == []


def test_simulated_figure_is_the_reservation() -> None:
    kernel = KernelImage("x", "v6.12", "16K", "p", "v", Path("Image"))
    # 4 GiB of 16K pages under v6.12: 422 pages, one 32 MiB PMD (tests/core, docs/model.md)
    assert simulated_reserved_bytes(kernel, MemoryMap.parse("4G")) == 32 * MIB


def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kernel-check", "--cache", str(tmp_path)]) == 2
    assert "scripts/fetch-kernels" in capsys.readouterr().err
    assert main(["kernel-check", "--image", str(tmp_path / "none")]) == 2
    assert "--profile" in capsys.readouterr().err
    image = tmp_path / "Image"
    image.write_bytes(b"x")
    assert main(["kernel-check", "--image", str(image), "--profile", "v9.9"]) == 2
    assert "unknown profile" in capsys.readouterr().err
    assert main(["kernel-check", "--image", str(image), "--profile", "v6.1",
                 "--memory", "3M"]) == 2


def _row(kernel_mib: int | None, match: bool, error: str | None = None) -> CheckRow:
    return CheckRow(flavour="6.12-4k", package="linux-image-6.12.117+deb13-arm64",
                    version="6.12.117-1", profile="v6.12", page_size="4K", memory="4G",
                    memblocks=1, kernel_mib=kernel_mib, simulator_mib=26,
                    simulator_bytes=26 * MIB, match=match, protected=match,
                    kernel_release="6.12.117+deb13-arm64", boot_seconds=5.0, error=error)


def test_reports_name_the_package_version_and_each_difference() -> None:
    rows = [_row(26, True), _row(None, False, "QEMU exited")]
    table = render_table(rows)
    assert "6.12.117-1" in table and "DIFFERS: QEMU exited" in table
    assert table.endswith("1/2 boots match the simulator")
    report = json.loads(render_json(rows))
    assert report["ok"] is False
    assert report["boots"][0]["version"] == "6.12.117-1"
    assert report["boots"][0]["kernel_mib"] == report["boots"][0]["simulator_mib"] == 26
