"""Pictures of the simulator, drawn with matplotlib (the `plot` extra).

- `draw_machine`: a running machine (`pkvm-sim draw`): where the carve-out sits in RAM, its
  regions, and one strip per pool showing reserved, allocated and free pages, each free block
  coloured by its order, beside the pool's free blocks per order.
- `plot_reservations`: the carve-out of several profiles as stacked bars (`reserve --plot`).
- `plot_scenario`: a scenario's figures over its faults (`scenario --plot`).

Everything here takes plain data (no gRPC, no simulator objects except frozen results), and
writes PNG or SVG, chosen by the file's suffix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from pkvm_sim.core.hypervisor import Hypervisor
    from pkvm_sim.core.reservation import Reservation
    from pkvm_sim.tools.scenario import ProfileResult

FORMATS = (".png", ".svg")
MIB = 1 << 20
GIB = 1 << 30
ALLOCATED_COLOUR = "#c44e52"
RESERVED_COLOUR = "#8c8c8c"
RAM_COLOUR = "#dbe9f6"
PART_COLOURS = {
    "vmemmap": "#4c72b0",
    "hyp": "#dd8452",
    "host_s2": "#55a868",
    "host_s2_mem": "#2f7a45",
    "host_s2_dev": "#8fd19e",
    "vm_table": "#8172b3",
    "ffa_proxy": "#937860",
    "slack": "#cccccc",
}


class PlotError(ValueError):
    """A picture cannot be written as asked (bad suffix, matplotlib missing)."""


def check_output(path: str | Path) -> Path:
    out = Path(path)
    if out.suffix.lower() not in FORMATS:
        raise PlotError(f"{out}: the picture's name must end in .png or .svg")
    return out


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as error:  # pragma: no cover - the test extra installs it
        raise PlotError("pictures need matplotlib: pip install 'pkvm-sim[plot]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Figure, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return out


def _human_bytes(value: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", 1024)):
        if value >= size:
            return f"{value / size:.1f} {unit}".replace(".0 ", " ")
    return f"{int(value)} B"


# --- a running machine ------------------------------------------------------------------------


@dataclass(frozen=True)
class PoolLayout:
    """One pool as GetMemoryMap describes it (pfns absolute)."""

    name: str
    base_pfn: int
    nr_pages: int
    reserved_pages: int
    free_blocks: tuple[tuple[int, int], ...]  # (head pfn, order), ascending
    admitted_pages: int = 0

    @property
    def free_pages(self) -> int:
        return sum(1 << order for _, order in self.free_blocks)

    @property
    def allocated_pages(self) -> int:
        return self.nr_pages - self.reserved_pages - self.free_pages_in_range

    @property
    def free_pages_in_range(self) -> int:
        end = self.base_pfn + self.nr_pages
        return sum(1 << order for pfn, order in self.free_blocks if pfn < end)

    def free_blocks_per_order(self, max_order: int) -> list[int]:
        counts = [0] * max_order
        for _, order in self.free_blocks:
            counts[order] += 1
        return counts


@dataclass(frozen=True)
class MachineLayout:
    page_size: int
    memblocks: tuple[tuple[int, int], ...]  # (base, size) in bytes
    carveout_base: int
    carveout_bytes: int
    carveout: tuple[tuple[str, int, int], ...]  # (region, base pfn, pages), in placement order
    pools: tuple[PoolLayout, ...] = field(default_factory=tuple)
    title: str = ""


def draw_machine(machine: MachineLayout, out: str | Path) -> Path:
    """The memory map, the carve-out's regions, then one strip per pool."""
    path = check_output(out)
    plt = _pyplot()
    max_order = 1 + max(
        (order for pool in machine.pools for _, order in pool.free_blocks), default=0
    )
    max_order = max(max_order, 11)
    cmap = plt.get_cmap("viridis", max_order)
    rows = 2 + len(machine.pools)
    fig = plt.figure(figsize=(14, 1.2 + 1.5 * rows))
    grid = fig.add_gridspec(rows, 2, width_ratios=(5, 1), hspace=0.9, wspace=0.08)
    _draw_ram(fig.add_subplot(grid[0, :]), machine)
    _draw_carveout(fig.add_subplot(grid[1, :]), machine)
    for row, pool in enumerate(machine.pools, start=2):
        _draw_pool_strip(fig.add_subplot(grid[row, 0]), pool, cmap)
        _draw_pool_orders(fig.add_subplot(grid[row, 1]), pool, cmap, max_order)
    if machine.title:
        fig.suptitle(machine.title, fontsize=13, y=0.995)
    return _save(fig, path)


def _draw_ram(ax: Axes, machine: MachineLayout) -> None:
    for base, size in machine.memblocks:
        ax.broken_barh([(base / GIB, size / GIB)], (0, 1), color=RAM_COLOUR, edgecolor="#5b7fa6")
    start = machine.carveout_base / GIB
    width = machine.carveout_bytes / GIB
    ax.broken_barh([(start, width)], (0, 1), color="#dd8452")
    ax.annotate(
        f"carve-out: {_human_bytes(machine.carveout_bytes)} at {machine.carveout_base:#x}",
        xy=(start + width / 2, 1), xytext=(0, 8), textcoords="offset points", ha="right",
        fontsize=9, arrowprops={"arrowstyle": "-", "color": "#555555"},
    )
    lo = min(base for base, _ in machine.memblocks) / GIB
    hi = max(base + size for base, size in machine.memblocks) / GIB
    ax.set_xlim(lo - (hi - lo) * 0.01, hi + (hi - lo) * 0.01)
    ax.set_ylim(0, 1.9)
    ax.set_yticks([])
    ax.set_xlabel("physical address (GiB)")
    ax.set_title("Host RAM (memblocks) and where kvm_hyp_reserve placed the carve-out",
                 loc="left", fontsize=10)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)


def _draw_carveout(ax: Axes, machine: MachineLayout) -> None:
    page = machine.page_size
    for name, base_pfn, pages in machine.carveout:
        start = (base_pfn * page - machine.carveout_base) / MIB
        width = pages * page / MIB
        ax.broken_barh([(start, width)], (0, 1), color=PART_COLOURS.get(name, "#bbbbbb"),
                       edgecolor="white")
        label = f"{name}\n{_human_bytes(pages * page)}"
        if width > machine.carveout_bytes / MIB * 0.06:
            ax.text(start + width / 2, 0.5, label, ha="center", va="center", fontsize=8)
        else:  # too narrow to hold its label: above it, reading rightwards
            ax.annotate(label.replace("\n", " "), xy=(start + width / 2, 1), xytext=(2, 6),
                        textcoords="offset points", ha="left", va="bottom", fontsize=8,
                        arrowprops={"arrowstyle": "-", "color": "#555555"})
    ax.set_xlim(0, machine.carveout_bytes / MIB)
    ax.set_ylim(0, 1.7)
    ax.set_yticks([])
    ax.set_xlabel(f"MiB from the carve-out's base ({machine.carveout_base:#x})")
    ax.set_title("The carve-out, region by region (EL2's early allocator order)", loc="left",
                 fontsize=10)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)


def _draw_pool_strip(ax: Axes, pool: PoolLayout, cmap: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    total = pool.nr_pages
    ax.broken_barh([(0, total)], (0, 1), color=ALLOCATED_COLOUR)
    if pool.reserved_pages:
        ax.broken_barh([(0, pool.reserved_pages)], (0, 1), color=RESERVED_COLOUR,
                       hatch="//", edgecolor="white")
    by_order: dict[int, list[tuple[int, int]]] = {}
    for pfn, order in pool.free_blocks:
        if pfn < pool.base_pfn + total:
            by_order.setdefault(order, []).append((pfn - pool.base_pfn, 1 << order))
    for order, spans in sorted(by_order.items()):
        # White edges tell neighbouring blocks apart, but would hide blocks a few pages wide.
        wide = (1 << order) * 400 >= total
        ax.broken_barh(spans, (0, 1), color=cmap(order), edgecolor="white" if wide else "none",
                       linewidth=0.4 if wide else 0)
    ax.set_xlim(0, total)
    ax.set_ylim(0, 1)
    ax.set_yticks([])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(f"page offset in the pool (base pfn {pool.base_pfn:#x})", fontsize=8)
    ax.tick_params(axis="x", labelsize=8)
    admitted = f", +{pool.admitted_pages} admitted" if pool.admitted_pages else ""
    ax.set_title(
        f"pool {pool.name}: {total} pages{admitted} - {pool.free_pages_in_range} free "
        f"(coloured by block order), {pool.allocated_pages} allocated (red), "
        f"{pool.reserved_pages} reserved (grey)", loc="left", fontsize=9,
    )


def _draw_pool_orders(ax: Axes, pool: PoolLayout, cmap: Any, max_order: int) -> None:
    counts = pool.free_blocks_per_order(max_order)
    orders = list(range(max_order))
    ax.bar(orders, counts, color=[cmap(o) for o in orders], edgecolor="#333333", linewidth=0.4)
    ax.set_xticks(orders[::2])
    ax.tick_params(labelsize=7)
    ax.set_xlabel("order", fontsize=8)
    ax.set_title("free blocks per order", fontsize=8)
    ax.set_ylim(0, max(max(counts, default=0), 1) * 1.25)
    for order, count in zip(orders, counts, strict=True):
        if count:
            ax.text(order, count, str(count), ha="center", va="bottom", fontsize=6)


# --- reserve --compare --plot -----------------------------------------------------------------


def carveout_parts(reservation: Reservation) -> list[tuple[str, int]]:
    """(part, bytes) of a carve-out in placement order (divide_memory_pool): vmemmap, VM table
    (v6.2+), hyp, the host stage-2 pool(s), FF-A proxy (v6.4+), slack."""
    page = reservation.page_size
    parts = [("vmemmap", reservation.vmemmap_pages)]
    if reservation.vm_table_pages:
        parts.append(("vm_table", reservation.vm_table_pages))
    parts.append(("hyp", reservation.hyp_s1_pgtable_pages))
    parts += list(reservation.host_s2_pools)
    if reservation.ffa_proxy_pages:
        parts.append(("ffa_proxy", reservation.ffa_proxy_pages))
    in_bytes = [(name, pages * page) for name, pages in parts]
    return [*in_bytes, ("slack", reservation.reserved_bytes - reservation.hyp_mem_bytes)]


def plot_reservations(reservations: Sequence[Reservation], out: str | Path,
                      labels: Sequence[str] | None = None) -> Path:
    """One stacked bar per profile: the carve-out's parts in MiB, total and vmemmap cost."""
    path = check_output(out)
    if not reservations:
        raise PlotError("nothing to plot: no reservation")
    plt = _pyplot()
    names = list(labels) if labels is not None else [
        f"{r.profile} ({r.layout_name}-byte hyp_page)" for r in reservations
    ]
    fig, ax = plt.subplots(figsize=(2.2 + 2.0 * len(reservations), 5.5))
    seen: set[str] = set()
    for x, reservation in enumerate(reservations):
        bottom = 0.0
        for part, size in carveout_parts(reservation):
            height = size / MIB
            ax.bar(x, height, bottom=bottom, width=0.6, color=PART_COLOURS.get(part, "#bbbbbb"),
                   edgecolor="white", label=None if part in seen else part)
            seen.add(part)
            if height > reservation.reserved_bytes / MIB * 0.05:
                ax.text(x, bottom + height / 2, f"{height:.1f}", ha="center", va="center",
                        fontsize=8)
            bottom += height
        ax.text(x, bottom, f"carve-out {_human_bytes(reservation.reserved_bytes)}",
                ha="center", va="bottom", fontsize=8)
        # Beside it: the hyp_vmemmap of all memory (coverage 'all'), which the series shrank.
        whole = reservation.all_memory_vmemmap_pages * reservation.page_size / MIB
        ax.bar(x + 0.42, whole, width=0.18, color="none", edgecolor=PART_COLOURS["vmemmap"],
               hatch="///", label=None if "whole" in seen else "hyp_vmemmap of all RAM")
        seen.add("whole")
        ax.text(x + 0.42, whole, f"{_human_bytes(whole * MIB)}\n"
                f"({_human_bytes(reservation.vmemmap_bytes_per_gib)}/GiB)",
                ha="center", va="bottom", fontsize=7, color=PART_COLOURS["vmemmap"])
    ax.set_xticks([x + 0.1 for x in range(len(reservations))], names, fontsize=8)
    ax.set_ylabel("MiB")
    top = max(max(r.reserved_bytes, r.all_memory_vmemmap_pages * r.page_size)
              for r in reservations) / MIB
    ax.set_ylim(0, top * 1.22)
    ram = sum(block.size for block in reservations[0].memblocks)
    ax.set_title(f"EL2 carve-out per profile (stacked) and the hyp_vmemmap of all "
                 f"{_human_bytes(ram)} of RAM (hatched)", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, title="part",
              title_fontsize=8)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return _save(fig, path)


# --- scenario --plot ------------------------------------------------------------------------


@dataclass
class ScenarioTimeline:
    """Samples taken after each MMIO fault of one profile's run."""

    profile: str
    faults: list[int] = field(default_factory=list)
    used_pages: dict[str, list[int]] = field(default_factory=dict)  # host pool -> in use
    pool_pages: dict[str, int] = field(default_factory=dict)  # host pool -> size
    recycles: list[int] = field(default_factory=list)

    def sample(self, faults: int, used: dict[str, int], recycles: int) -> None:
        self.faults.append(faults)
        for pool, pages in used.items():
            self.used_pages.setdefault(pool, []).append(pages)
        self.recycles.append(recycles)


def sampler(timeline: ScenarioTimeline) -> Callable[[Hypervisor, ProfileResult], None]:
    """A scenario `on_fault` hook recording into `timeline`."""

    def on_fault(hv: Hypervisor, result: ProfileResult) -> None:
        stats = hv.statistics(vm_pools=False)
        host_pools = [p for p in stats.pools if p.name != "hyp"]
        timeline.pool_pages = {p.name: p.total_pages - p.reserved_pages for p in host_pools}
        used = {p.name: p.total_pages - p.reserved_pages - p.free_pages for p in host_pools}
        timeline.sample(result.mmio_faults, used, stats.host_stage2.mmio_recycles)

    return on_fault


def plot_scenario(timelines: Sequence[ScenarioTimeline], out: str | Path,
                  title: str = "") -> Path:
    """Host stage-2 pool pages in use against each pool's size, and MMIO recycles."""
    path = check_output(out)
    if not timelines or not any(t.faults for t in timelines):
        raise PlotError("nothing to plot: the scenario recorded no fault")
    plt = _pyplot()
    fig, (used, recycled) = plt.subplots(2, 1, figsize=(11, 7), sharex=True,
                                         gridspec_kw={"hspace": 0.12, "height_ratios": (3, 2)})
    colours = plt.get_cmap("tab10")
    line = 0
    profile_colour: dict[str, Any] = {}
    for t in timelines:
        for pool, series in t.used_pages.items():
            colour = colours(line)
            line += 1
            profile_colour[t.profile] = colour  # its last pool's: v5.13's MMIO pool
            used.plot(t.faults, series, color=colour, linewidth=1.3,
                      label=f"{t.profile} {pool}: pages in use")
            used.axhline(t.pool_pages[pool], color=colour, linestyle="--", linewidth=1,
                         label=f"{t.profile} {pool}: size ({t.pool_pages[pool]} pages)")
    for t in timelines:
        recycled.step(t.faults, t.recycles, where="post", color=profile_colour.get(t.profile),
                      linewidth=1.3, label=t.profile)
    top = max(size for t in timelines for size in t.pool_pages.values())
    used.set_ylim(0, max(top, 1) * 1.08)
    used.set_ylabel("host stage-2 pool pages")
    used.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    recycled.set_ylabel("MMIO recycles so far")
    recycled.set_xlabel("MMIO faults, in order (each span wider than the last)")
    recycled.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    used.set_title(title or "scenario over time", fontsize=10, loc="left")
    for ax in (used, recycled):
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    return _save(fig, path)
