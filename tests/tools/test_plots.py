"""Pictures: `pkvm-sim draw`, `reserve --compare --plot`, `scenario --plot`.

Each test checks that the file is written, is a real PNG/SVG of a sensible size, and is not
trivial: the PNG holds the colours the picture promises (allocated pages, free blocks of
several orders), not a blank canvas.
"""

from __future__ import annotations

import random
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from pkvm.v1 import hypervisor_pb2 as pb2
from pkvm.v1 import hypervisor_pb2_grpc as pb2_grpc
from pkvm_sim.cli import main
from pkvm_sim.service.server import RunningService, ServerSettings
from pkvm_sim.tools.plots import ALLOCATED_COLOUR, PoolLayout

from tests.service.fixtures import RawVM, start_service

matplotlib = pytest.importorskip("matplotlib")


def rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


def png_colours(path: Path) -> set[tuple[int, int, int]]:
    import matplotlib.image

    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 300 and pixels.shape[1] > 500
    flat = (pixels[:, :, :3].reshape(-1, 3) * 255).round().astype(int)
    return {tuple(p) for p in flat[:: max(1, len(flat) // 200_000)]}


def assert_png(path: Path, min_bytes: int = 20_000) -> set[tuple[int, int, int]]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > min_bytes
    colours = png_colours(path)
    assert len(colours) > 50, "a nearly blank picture"
    return colours


@pytest.fixture(scope="module")
def busy_service() -> Iterator[RunningService]:
    """A service whose hyp pool is fragmented: seeded allocations of mixed orders, some freed."""
    service = start_service(settings=ServerSettings(listen="127.0.0.1:0", metrics_listen=None,
                                                    workers=4))
    rng = random.Random(7)
    with grpc.insecure_channel(service.target) as channel:
        stub = pb2_grpc.HypervisorServiceStub(channel)
        vms = [RawVM(stub) for _ in range(4)]  # each well under the per-VM hyp-page quota
        held: list[tuple[RawVM, int]] = []
        for i in range(300):
            vm = vms[i % len(vms)]
            answer = stub.AllocPages(
                pb2.AllocPagesRequest(handle=vm.handle, order=rng.choice([0, 0, 1, 2, 3])),
                metadata=vm.md)
            held.append((vm, answer.pfn))
            if rng.random() < 0.4:
                owner, pfn = held.pop(rng.randrange(len(held)))
                stub.PutPage(pb2.PutPageRequest(handle=owner.handle, pfn=pfn),
                             metadata=owner.md)
    yield service
    service.stop(0)


def test_memory_map_rpc_agrees_with_get_stats(busy_service: RunningService) -> None:
    with grpc.insecure_channel(busy_service.target) as channel:
        stub = pb2_grpc.HypervisorServiceStub(channel)
        answer = stub.GetMemoryMap(pb2.GetMemoryMapRequest())
        stats = {p.name: p for p in stub.GetStats(pb2.GetStatsRequest()).pools}
        with pytest.raises(grpc.RpcError) as missing:
            stub.GetMemoryMap(pb2.GetMemoryMapRequest(pools=["no-such-pool"]))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as too_many:
            stub.GetMemoryMap(pb2.GetMemoryMapRequest(pools=["hyp"] * 17))
        assert too_many.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [p.name for p in answer.pools] == ["hyp", "host_s2"]
    assert sum(r.nr_pages for r in answer.carveout) * answer.page_size == answer.carveout_bytes
    for pool in answer.pools:
        expected = stats[pool.name]
        blocks = list(zip(pool.free_block_pfns, pool.free_block_orders, strict=True))
        # The same free lists GetStats counts, each block a buddy: aligned, inside the pool,
        # and no two overlapping.
        per_order = [0] * expected.max_order
        end = -1
        for pfn, order in blocks:
            per_order[order] += 1
            assert pfn % (1 << order) == 0 and pfn > end
            assert pool.base_pfn <= pfn and pfn + (1 << order) <= pool.base_pfn + pool.nr_pages
            end = pfn + (1 << order) - 1
        assert per_order == list(expected.free_blocks_per_order)
        assert sum(1 << order for _, order in blocks) == expected.free_pages


def test_draw_png_shows_allocated_pages_and_free_blocks(busy_service: RunningService,
                                                        tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    out = tmp_path / "machine.png"
    assert main(["draw", "--target", busy_service.target, "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    colours = assert_png(out)
    assert rgb(ALLOCATED_COLOUR) in colours  # the hyp pool's allocated pages are drawn
    cmap = matplotlib.colormaps["viridis"].resampled(11)
    order_colours = {tuple(round(c * 255) for c in cmap(order)[:3]) for order in range(11)}
    assert len(order_colours & colours) >= 4  # free blocks of several orders


def test_draw_svg_has_one_strip_per_pool(busy_service: RunningService, tmp_path: Path) -> None:
    out = tmp_path / "machine.svg"
    assert main(["draw", "--target", busy_service.target, "--out", str(out),
                 "--pool", "hyp", "--pool", "vm/4096"]) == 0
    root = ET.parse(out).getroot()
    assert root.tag.endswith("svg")
    text = out.read_text()
    assert "pool hyp:" in text and "pool vm/4096:" in text and "pool host_s2:" not in text


def test_draw_reports_errors_without_a_traceback(busy_service: RunningService, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["draw", "--target", busy_service.target, "--out", str(tmp_path / "x.jpg")]) == 2
    assert main(["draw", "--target", busy_service.target, "--out", str(tmp_path / "x.png"),
                 "--pool", "nope"]) == 1
    err = capsys.readouterr().err
    assert ".png or .svg" in err and "NOT_FOUND" in err
    assert not list(tmp_path.iterdir())


def test_reserve_compare_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "reserve.png"
    assert main(["reserve", "--compare", "--plot", str(out)]) == 0
    assert "v5.13" in capsys.readouterr().out  # the table is still printed
    colours = assert_png(out, min_bytes=10_000)
    assert rgb("#dd8452") in colours  # the hyp part of each stacked bar
    assert main(["reserve", "--compare", "--plot", str(tmp_path / "r.gif")]) == 2


def test_scenario_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "scenario.svg"
    assert main(["scenario", "mmio-pressure", "--page-size", "16K", "--ram-fragments", "64",
                 "--hole", "1M", "--span-base", "0x80000000", "--faults-per-span", "300",
                 "--plot", str(out)]) == 0
    text = out.read_text()
    ET.fromstring(text)
    assert "v5.13 host_s2_dev" in text and "v5.14 host_s2" in text
    assert len(text) > 30_000


def test_pool_layout_arithmetic() -> None:
    # 16 pages from pfn 0x100: 2 reserved, free blocks of 2 (at 0x104) and 8 (at 0x108).
    pool = PoolLayout("p", 0x100, 16, 2, ((0x104, 1), (0x108, 3)))
    assert pool.free_pages_in_range == 10
    assert pool.allocated_pages == 16 - 2 - 10
    assert pool.free_blocks_per_order(4) == [0, 1, 0, 1]
