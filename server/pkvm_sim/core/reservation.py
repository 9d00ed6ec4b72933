"""How much memory the host reserves for EL2, and how EL2 carves it up (SEMANTICS 1.3 to 1.6).

The host (`kvm_hyp_reserve`, arch/arm64/kvm/hyp/reserved_mem.c) sizes one contiguous carve-out
before EL2 exists; EL2 (`divide_memory_pool`, nvhe/setup.c) then hands it out with a bump
allocator. Everything here is arithmetic on the configuration: no state, no I/O.

Budgets, in pages of size P with E = P / 8 entries per table page:

    M(n) = a1 + a2 + a3 + a4,  a1 = ceil(n/E), a(k+1) = ceil(a(k)/E)   (4 levels, any P)
    T    = sum over memblocks of M(size / P)                          (map all memory)
    G    = M(1 GiB / P)                                               (1 GiB allowance)
    S1   = T + G (+ hyp_pool_extra_pages, a simulator knob)           hyp stage-1 pool
    v5.13: MEM = T + 16, DEV = G                                      two host stage-2 pools
    v5.14: S2  = T + 16 + G                                           one host stage-2 pool
    H    = S1 + S2  (= S1 + MEM + DEV)
    V    = fixed point of  V -> ceil((H + V) * sizeof(hyp_page) / P) + M(that)
    hyp_mem_pages = H + V

v6.1 is exactly this. v6.12 (profiles.py decides which terms apply) counts 5 levels in M(),
adds the VM table (1 page) and the FF-A proxy (2 + ceil(32864 / P) pages) to H, and replaces
the fixed point by every memblock's vmemmap slice rounded out to pages, summed region by
region (docs/model.md).

Worked example A (4K pages, one 4 GiB memblock at 0x8000_0000, v5.14):

    T = 2048 + 4 + 1 + 1 = 2054     G = 512 + 1 + 1 + 1 = 515
    S1 = 2569   S2 = 2585   H = 5154   V = ceil(5154*4/4096) + M(6) = 6 + 4 = 10
    hyp_mem_pages = 5164 (20.17 MiB) -> PMD-rounded to 22 MiB at 0x1_7EA0_0000

    0x1_7EA0_0000  vmemmap   6 pages   (the carve-out's own slice of the vmemmap)
    0x1_7EA0_6000  hyp       2569 pages
    0x1_7F40_F000  host_s2   2585 pages
    0x1_7FE2_8000  slack     472 pages
    0x1_8000_0000  end

`hyp_pool_extra_pages` (SEMANTICS A.3) enlarges the hyp pool for load tests. It is added to S1
*before* the vmemmap fixed point, so V, hyp_mem_pages and the reservation all grow with it and
the overhead figures show its cost; with 0 every number equals the kernel's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from .config import Memblock, SimConfig
from .layout import MIB, PageGeometry, Profile, ceil_div
from .profiles import HostS2Pool, KernelProfile, VmemmapReservation, profile_spec

__all__ = [
    "HOST_S2_PGD_MAX_PAGES",
    "CarveoutLayout",
    "CarveoutRegion",
    "JSON_KEYS",
    "Reservation",
    "all_memory_vmemmap_pages",
    "compare_profiles",
    "compute_reservation",
    "config_for_profile",
    "gib_allowance_pages",
    "host_s2_pool_budget",
    "hyp_pgtable_max_pages",
    "hyp_pgtable_total_pages",
    "partition_carveout",
    "place_carveout",
    "ffa_proxy_pages",
    "vm_table_pages",
    "vmemmap_backing_pages",
    "vmemmap_pages_fixed_point",
    "vmemmap_region_pages",
]

HOST_S2_PGD_MAX_PAGES = 16  # upper bound of concatenated host stage-2 PGD pages (the "+16")
HYP_PGTABLE_LEVELS = 4  # M() counts 4 levels whatever the page size (up to v6.8)
POINTER_BYTES = 8  # sizeof(void *) on arm64
_FIXED_POINT_MAX_ITERATIONS = 64  # converges in 2 or 3 steps; this only guards a bug

# The six figures every front end (CLI --json, service, metrics) reports, in this order.
JSON_KEYS = (
    "hyp_s1_pgtable_pages",
    "host_s2_pgtable_pages",
    "vmemmap_pages",
    "hyp_mem_pages",
    "reserved_bytes",
    "vmemmap_bytes_per_gib",
)


def align_down(value: int, alignment: int) -> int:
    return value - value % alignment


def align_up(value: int, alignment: int) -> int:
    return align_down(value + alignment - 1, alignment)


# --------------------------------------------------------------------------------------------
# Page-table budgets (nvhe/mm.h)
# --------------------------------------------------------------------------------------------


def hyp_pgtable_max_pages(
    nr_pages: int, geometry: PageGeometry, levels: int = HYP_PGTABLE_LEVELS
) -> int:
    """M(n), `__hyp_pgtable_max_pages`: worst-case table pages to map n contiguous pages at
    page granularity, counting `levels` levels whatever the page size (4 up to v6.8:
    KVM_PGTABLE_MAX_LEVELS; 5 from v6.9: KVM_PGTABLE_FIRST_LEVEL -1 to LAST_LEVEL 3)."""
    if nr_pages < 0:
        raise ValueError(f"nr_pages must not be negative, not {nr_pages}")
    total_pages = 0
    level_pages = nr_pages
    for _ in range(levels):
        level_pages = ceil_div(level_pages, geometry.ptrs_per_table)
        total_pages += level_pages
    return total_pages


def hyp_pgtable_total_pages(
    memblocks: tuple[Memblock, ...], geometry: PageGeometry, levels: int = HYP_PGTABLE_LEVELS
) -> int:
    """T, `__hyp_pgtable_total_pages`: M() of every memblock, summed region by region."""
    return sum(
        hyp_pgtable_max_pages(block.size // geometry.page_size, geometry, levels)
        for block in memblocks
    )


def gib_allowance_pages(geometry: PageGeometry, levels: int = HYP_PGTABLE_LEVELS) -> int:
    """G = M(1 GiB / P): 515 (4K), 35 (16K), 5 (64K) with 4 levels; 516, 36, 6 with 5."""
    return hyp_pgtable_max_pages(geometry.pages_per_gib, geometry, levels)


def vm_table_pages(kernel: KernelProfile, geometry: PageGeometry) -> int:
    """`hyp_vm_table_pages`: one pointer per VM slot (KVM_MAX_PVMS), page aligned; 0 before
    v6.2 (no table). 255 pointers: 1 page with 4K, 16K or 64K pages."""
    return ceil_div(kernel.vm_table_entries * POINTER_BYTES, geometry.page_size)


def ffa_proxy_pages(kernel: KernelProfile, geometry: PageGeometry) -> int:
    """`hyp_ffa_proxy_pages`: the RX and TX mailboxes plus a buffer for the largest
    fragmented memory descriptor EL3 may return (v6.4+): 2 + 9 (4K), 2 + 3 (16K), 2 + 1 (64K)
    in v6.12."""
    if not kernel.has_ffa_proxy:
        return 0
    return kernel.ffa_mailbox_pages + ceil_div(kernel.ffa_descriptor_bytes, geometry.page_size)


def host_s2_pool_budget(pool: HostS2Pool, t_pages: int, g_pages: int) -> int:
    """Pages of one host stage-2 pool: what its record says it budgets (T, 16, G)."""
    return (
        (t_pages if pool.hyp_tables_for_memory else 0)
        + (HOST_S2_PGD_MAX_PAGES if pool.pgd_pages else 0)
        + g_pages * pool.gib_allowances
    )


def vmemmap_pages_fixed_point(
    pre_vmemmap_pages: int, entry_bytes: int, geometry: PageGeometry,
    levels: int = HYP_PGTABLE_LEVELS,
) -> int:
    """V: the pages backing the vmemmap must themselves have vmemmap entries, and M() of them
    budgets the stage-1 tables mapping them. Iterate from V = 0 until V is stable."""
    vmemmap_pages = 0
    for _ in range(_FIXED_POINT_MAX_ITERATIONS):
        covered_pages = pre_vmemmap_pages + vmemmap_pages
        next_pages = ceil_div(covered_pages * entry_bytes, geometry.page_size)
        next_pages += hyp_pgtable_max_pages(next_pages, geometry, levels)
        if next_pages == vmemmap_pages:
            return vmemmap_pages
        vmemmap_pages = next_pages
    raise AssertionError("vmemmap fixed point did not converge")  # f() is monotone, tiny slope


# --------------------------------------------------------------------------------------------
# vmemmap backing (1.3, 1.5)
# --------------------------------------------------------------------------------------------


def _vmemmap_span(base: int, end: int, entry_bytes: int, geometry: PageGeometry) -> tuple[int, int]:
    """Byte offsets [start, end) in the vmemmap, page aligned, backing the pfns of [base, end)."""
    shift = geometry.page_shift
    start_bytes = align_down((base >> shift) * entry_bytes, geometry.page_size)
    end_bytes = align_up((end >> shift) * entry_bytes, geometry.page_size)
    return start_bytes, end_bytes


def vmemmap_backing_pages(base: int, end: int, entry_bytes: int, geometry: PageGeometry) -> int:
    """Pages backing the vmemmap entries of [base, end): 6 for example A's carve-out in v5.14,
    44 with 32-byte entries (the slice is rounded out to whole pages at both ends)."""
    start_bytes, end_bytes = _vmemmap_span(base, end, entry_bytes, geometry)
    return (end_bytes - start_bytes) // geometry.page_size


def vmemmap_region_pages(
    memblocks: tuple[Memblock, ...], entry_bytes: int, geometry: PageGeometry
) -> int:
    """`hyp_vmemmap_pages` (v6.2+): each memblock's slice of the vmemmap rounded out to whole
    pages, summed region by region. A page shared by the slices of two neighbouring regions
    is counted twice: this is what the kernel reserves, not what it backs (see
    all_memory_vmemmap_pages)."""
    total_pages = 0
    for block in memblocks:
        start_bytes, end_bytes = _vmemmap_span(block.base, block.end, entry_bytes, geometry)
        total_pages += (end_bytes - start_bytes) // geometry.page_size
    return total_pages


def all_memory_vmemmap_pages(
    memblocks: tuple[Memblock, ...], entry_bytes: int, geometry: PageGeometry
) -> int:
    """V62 rule: back the vmemmap of every memblock; a page shared by the slices of two
    consecutive regions is counted once (what is backed; vmemmap_region_pages is what v6.2+
    reserves). 1024 pages for 4 GiB with 4-byte entries."""
    total_pages = 0
    covered_end_bytes = 0  # invariant: every vmemmap byte below this is already counted
    for block in sorted(memblocks):
        start_bytes, end_bytes = _vmemmap_span(block.base, block.end, entry_bytes, geometry)
        start_bytes = max(start_bytes, covered_end_bytes)
        if end_bytes > start_bytes:
            total_pages += (end_bytes - start_bytes) // geometry.page_size
            covered_end_bytes = end_bytes
    return total_pages


# --------------------------------------------------------------------------------------------
# Placement (1.4): memblock_find_in_range, top-down
# --------------------------------------------------------------------------------------------


def _find_top_down(
    memblocks: tuple[Memblock, ...], size_bytes: int, align_bytes: int, floor: int
) -> int | None:
    """Highest `align_bytes`-aligned base of a free block of `size_bytes`, or None.

    Like memblock, the search never returns an address below `floor` (one page: memblock
    skips the first page, and 0 means failure to kvm_hyp_reserve)."""
    for block in sorted(memblocks, reverse=True):
        if block.end - size_bytes < 0:
            continue
        candidate = align_down(block.end - size_bytes, align_bytes)
        if candidate >= max(block.base, floor):
            return candidate
    return None


def place_carveout(
    memblocks: tuple[Memblock, ...], hyp_mem_bytes: int, geometry: PageGeometry
) -> tuple[int, int]:
    """(base, reserved_bytes) of the carve-out, as kvm_hyp_reserve places it.

    First a PMD-aligned block of align_up(size, PMD) (the reservation is then that rounded
    size), else an exact-size page-aligned block; both searched top-down."""
    pmd_bytes = geometry.pmd_size
    rounded_bytes = align_up(hyp_mem_bytes, pmd_bytes)
    floor = geometry.page_size
    base = _find_top_down(memblocks, rounded_bytes, pmd_bytes, floor)
    if base is not None:
        return base, rounded_bytes
    base = _find_top_down(memblocks, hyp_mem_bytes, geometry.page_size, floor)
    if base is None:
        hyp_mem_pages = hyp_mem_bytes // geometry.page_size
        raise ValueError(
            f"no memblock has room for the hyp carve-out of {hyp_mem_pages} pages "
            f"({hyp_mem_bytes / MIB:.2f} MiB): kvm_hyp_reserve would fail"
        )
    return base, hyp_mem_bytes


def _check_carveout_override(
    memblocks: tuple[Memblock, ...], base: int, hyp_mem_bytes: int, geometry: PageGeometry
) -> int:
    """reserved_bytes for a carve-out the user placed at `base`.

    The base stands for where the kernel's search ended up. A PMD-aligned base whose memblock
    holds the PMD-rounded size is taken as a successful first attempt (rounded size); any other
    base as the exact-size fallback. Raises ValueError if the base is misplaced."""
    if base % geometry.page_size:
        raise ValueError(f"carveout_base {base:#x} is not page aligned")
    block = next((b for b in memblocks if b.base <= base < b.end), None)
    if block is None:
        raise ValueError(f"carveout_base {base:#x} lies in no memblock")
    rounded_bytes = align_up(hyp_mem_bytes, geometry.pmd_size)
    if base % geometry.pmd_size == 0 and base + rounded_bytes <= block.end:
        return rounded_bytes
    if base + hyp_mem_bytes <= block.end:
        return hyp_mem_bytes
    raise ValueError(
        f"carveout_base {base:#x}: memblock {block} has no room for "
        f"{hyp_mem_bytes:#x} bytes from there"
    )


# --------------------------------------------------------------------------------------------
# The reservation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reservation:
    """The carve-out `kvm_hyp_reserve` makes for one configuration (all counts in pages of
    `page_size`). `host_s2_pools` lists the host stage-2 pools of the profile (profiles.py):
    v5.13 has two, host_s2_mem (MEM) and host_s2_dev (DEV), v5.14 one, host_s2 (S2);
    `host_s2_mem_pages` / `host_s2_dev_pages` are None for a profile without that pool (there
    is no such pool, not an empty one).

    `all_memory_vmemmap_pages` is the vmemmap backing for the configured coverage: every
    memblock under 'all' (V62 rule), the carve-out's own slice under 'carveout'; a vmemmap page
    shared by two neighbouring regions is backed once. `vmemmap_region_pages` is what v6.2+
    kernels reserve for all memory instead: each region's slice rounded out to pages, summed
    (a shared page counted twice). Up to v6.1 both are reported beside the reservation, never
    added to it: the six kernel figures do not depend on coverage.
    """

    profile: Profile
    page_size: int
    layout_name: str
    entry_bytes: int
    memblocks: tuple[Memblock, ...]
    hyp_pgtable_total_pages: int  # T
    gib_allowance_pages: int  # G
    hyp_pool_extra_pages: int  # added to S1 (0 = kernel numbers)
    hyp_s1_pgtable_pages: int  # S1 = T + G + extra
    host_s2_pgtable_pages: int  # S2 (v5.14) or MEM + DEV (v5.13): the sum of host_s2_pools
    host_s2_pools: tuple[tuple[str, int], ...]  # (pool name, pages), in carve-out order
    vm_table_pages: int  # the hyp VM table (v6.2+; else 0)
    ffa_proxy_pages: int  # FF-A mailboxes and descriptor buffer (v6.4+; else 0)
    pre_vmemmap_pages: int  # H = S1 + S2 + VM table + FF-A
    vmemmap_pages: int  # V: the fixed point (up to v6.1) or the region-by-region sum (v6.2+)
    hyp_pgtable_levels: int  # levels M() counted (4, or 5 from v6.9)
    hyp_mem_pages: int  # H + V
    reserved_bytes: int  # hyp_mem_pages * P, PMD-rounded when the PMD attempt succeeded
    pmd_rounded: bool
    carveout_base: int
    vmemmap_bytes_per_gib: int
    vmemmap_coverage: str
    all_memory_vmemmap_pages: int
    vmemmap_region_pages: int  # every memblock's vmemmap slice, summed region by region

    def __post_init__(self) -> None:
        self.check_invariants()

    def check_invariants(self) -> None:
        assert self.hyp_mem_pages == self.pre_vmemmap_pages + self.vmemmap_pages
        assert self.pre_vmemmap_pages == (
            self.hyp_s1_pgtable_pages + self.host_s2_pgtable_pages + self.vm_table_pages
            + self.ffa_proxy_pages
        )
        assert self.host_s2_pgtable_pages == sum(nr for _name, nr in self.host_s2_pools)
        assert self.reserved_bytes >= self.hyp_mem_bytes
        assert self.reserved_bytes % self.page_size == 0
        assert self.carveout_base % self.page_size == 0

    def host_s2_pool_pages(self, name: str) -> int | None:
        """Pages of the host stage-2 pool `name`, or None if the profile has no such pool."""
        return dict(self.host_s2_pools).get(name)

    @property
    def host_s2_mem_pages(self) -> int | None:
        """MEM = T + 16, v5.13's memory pool (None in a profile with one merged pool)."""
        return self.host_s2_pool_pages("host_s2_mem")

    @property
    def host_s2_dev_pages(self) -> int | None:
        """DEV = G, v5.13's MMIO pool (None in a profile with one merged pool)."""
        return self.host_s2_pool_pages("host_s2_dev")

    @property
    def hyp_mem_bytes(self) -> int:
        return self.hyp_mem_pages * self.page_size

    @property
    def reserved_pages(self) -> int:
        return self.reserved_bytes // self.page_size

    @property
    def carveout_end(self) -> int:
        return self.carveout_base + self.reserved_bytes

    def to_json_dict(self, *, detail: bool = False) -> dict[str, Any]:
        """The six headline figures (JSON_KEYS) at top level; with `detail`, everything else
        under the single extra key "detail"."""
        figures: dict[str, Any] = {key: getattr(self, key) for key in JSON_KEYS}
        if detail:
            figures["detail"] = {
                "profile": self.profile.value,
                "page_size": self.page_size,
                "hyp_page_layout": self.layout_name,
                "entry_bytes": self.entry_bytes,
                "hyp_pgtable_total_pages": self.hyp_pgtable_total_pages,
                "gib_allowance_pages": self.gib_allowance_pages,
                "hyp_pool_extra_pages": self.hyp_pool_extra_pages,
                "host_s2_mem_pages": self.host_s2_mem_pages,
                "host_s2_dev_pages": self.host_s2_dev_pages,
                "vm_table_pages": self.vm_table_pages,
                "ffa_proxy_pages": self.ffa_proxy_pages,
                "hyp_pgtable_levels": self.hyp_pgtable_levels,
                "pre_vmemmap_pages": self.pre_vmemmap_pages,
                "pmd_rounded": self.pmd_rounded,
                "carveout_base": self.carveout_base,
                "carveout_end": self.carveout_end,
                "vmemmap_coverage": self.vmemmap_coverage,
                "all_memory_vmemmap_pages": self.all_memory_vmemmap_pages,
                "vmemmap_region_pages": self.vmemmap_region_pages,
            }
        return figures


def compute_reservation(config: SimConfig) -> Reservation:
    """kvm_hyp_reserve for `config`: budgets, vmemmap fixed point, placement.

    Raises ValueError when no memblock can hold the carve-out or `config.carveout_base` is
    misplaced (too many memblocks is already refused by SimConfig)."""
    geometry = config.geometry
    layout = config.layout
    kernel = config.kernel
    levels = kernel.hyp_pgtable_levels
    t_pages = hyp_pgtable_total_pages(config.memblocks, geometry, levels)
    g_pages = gib_allowance_pages(geometry, levels)
    s1_pages = t_pages + g_pages + config.hyp_pool_extra_pages
    host_s2_pools = tuple(
        (pool.name, host_s2_pool_budget(pool, t_pages, g_pages)) for pool in kernel.host_s2_pools
    )
    s2_pages = sum(nr for _name, nr in host_s2_pools)
    table_pages = vm_table_pages(kernel, geometry)
    ffa_pages = ffa_proxy_pages(kernel, geometry)
    h_pages = s1_pages + s2_pages + table_pages + ffa_pages
    if kernel.vmemmap_reservation is VmemmapReservation.ALL_MEMORY:
        v_pages = vmemmap_region_pages(config.memblocks, layout.entry_bytes, geometry)
    else:
        v_pages = vmemmap_pages_fixed_point(h_pages, layout.entry_bytes, geometry, levels)
    hyp_mem_bytes = (h_pages + v_pages) * geometry.page_size

    if config.carveout_base is None:
        base, reserved_bytes = place_carveout(config.memblocks, hyp_mem_bytes, geometry)
    else:
        base = config.carveout_base
        reserved_bytes = _check_carveout_override(config.memblocks, base, hyp_mem_bytes, geometry)

    if config.vmemmap_coverage == "all":
        coverage_pages = all_memory_vmemmap_pages(config.memblocks, layout.entry_bytes, geometry)
    else:
        coverage_pages = vmemmap_backing_pages(
            base, base + reserved_bytes, layout.entry_bytes, geometry
        )

    return Reservation(
        profile=config.profile,
        page_size=geometry.page_size,
        layout_name=layout.name,
        entry_bytes=layout.entry_bytes,
        memblocks=config.memblocks,
        hyp_pgtable_total_pages=t_pages,
        gib_allowance_pages=g_pages,
        hyp_pool_extra_pages=config.hyp_pool_extra_pages,
        hyp_s1_pgtable_pages=s1_pages,
        host_s2_pgtable_pages=s2_pages,
        host_s2_pools=host_s2_pools,
        vm_table_pages=table_pages,
        ffa_proxy_pages=ffa_pages,
        pre_vmemmap_pages=h_pages,
        vmemmap_pages=v_pages,
        hyp_pgtable_levels=levels,
        hyp_mem_pages=h_pages + v_pages,
        reserved_bytes=reserved_bytes,
        pmd_rounded=reserved_bytes != hyp_mem_bytes,
        carveout_base=base,
        vmemmap_bytes_per_gib=layout.entry_bytes * geometry.pages_per_gib,
        vmemmap_coverage=config.vmemmap_coverage,
        all_memory_vmemmap_pages=coverage_pages,
        vmemmap_region_pages=vmemmap_region_pages(config.memblocks, layout.entry_bytes, geometry),
    )


def compare_profiles(
    config: SimConfig, profiles: Sequence[Profile | str] = (Profile.V5_13, Profile.V5_14)
) -> tuple[Reservation, ...]:
    """The reservations of the same machine under each of `profiles`, in that order, each with
    its profile's own hyp_page layout (config.hyp_page_layout is ignored). The default pair is
    the series' before/after view."""
    return tuple(compute_reservation(config_for_profile(config, p)) for p in profiles)


def config_for_profile(config: SimConfig, profile: Profile | str) -> SimConfig:
    """The same machine under `profile`, with that profile's hyp_page layout; a profile whose
    EL2 vmemmap covers all memory (v6.2+) gets vmemmap coverage 'all'."""
    kernel = profile_spec(profile)
    coverage = config.vmemmap_coverage
    if kernel.vmemmap_reservation is VmemmapReservation.ALL_MEMORY:
        coverage = "all"
    return replace(config, profile=kernel.profile, hyp_page_layout=None, vmemmap_coverage=coverage)


# --------------------------------------------------------------------------------------------
# EL2 partition of the carve-out (1.5, divide_memory_pool)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CarveoutRegion:
    """One bump allocation: `nr_pages` pages from pfn `base_pfn`."""

    name: str  # 'vmemmap', ['vm_table'], 'hyp', 'host_s2' | 'host_s2_mem' + 'host_s2_dev',
    # ['ffa_proxy'], 'slack'
    base_pfn: int
    nr_pages: int
    page_size: int

    @property
    def end_pfn(self) -> int:
        return self.base_pfn + self.nr_pages

    @property
    def base(self) -> int:
        return self.base_pfn * self.page_size

    @property
    def end(self) -> int:
        return self.end_pfn * self.page_size

    @property
    def size_bytes(self) -> int:
        return self.nr_pages * self.page_size


@dataclass(frozen=True)
class CarveoutLayout:
    """The carve-out as EL2's early allocator hands it out, regions in bump order.

    Invariant: regions are contiguous, start at the carve-out base and end at its end (the
    last one is the slack, possibly 0 pages). `hyp_reserved_pages` is how many pages at the
    start of the hyp pool the stage-1 rebuild consumed (config.hyp_s1_early_used_pages): hpool
    is initialised with them reserved."""

    profile: Profile
    page_size: int
    base_pfn: int
    nr_pages: int
    regions: tuple[CarveoutRegion, ...]
    hyp_reserved_pages: int

    def __post_init__(self) -> None:
        self.check_invariants()

    def check_invariants(self) -> None:
        next_pfn = self.base_pfn
        for region in self.regions:
            assert region.base_pfn == next_pfn and region.nr_pages >= 0
            next_pfn = region.end_pfn
        assert next_pfn == self.base_pfn + self.nr_pages
        assert self.regions[-1].name == "slack"

    def region(self, name: str) -> CarveoutRegion:
        for region in self.regions:
            if region.name == name:
                return region
        raise KeyError(f"no carve-out region {name!r} in profile {self.profile.value}")

    @property
    def used_end(self) -> int:
        """First byte after the last pool (start of the slack)."""
        return self.region("slack").base

    @property
    def slack_pages(self) -> int:
        return self.region("slack").nr_pages


def partition_carveout(reservation: Reservation, config: SimConfig) -> CarveoutLayout:
    """divide_memory_pool: the vmemmap (the carve-out's slice; all memory from v6.2), the VM
    table (v6.2+), the hyp stage-1 pool (S1), the host stage-2 pool(s), the FF-A proxy pages
    (v6.4+), then slack. Raises ValueError if `config` does not describe `reservation`'s machine,
    if the pools do not fit (__pkvm_init's -ENOMEM) or if hyp_s1_early_used_pages > S1."""
    if (config.profile, config.page_size, config.layout.entry_bytes) != (
        reservation.profile,
        reservation.page_size,
        reservation.entry_bytes,
    ):
        raise ValueError("reservation was computed for another profile, page size or layout")
    early_pages = config.hyp_s1_early_used_pages or 0
    if early_pages > reservation.hyp_s1_pgtable_pages:
        raise ValueError(
            f"hyp_s1_early_used_pages {config.hyp_s1_early_used_pages} exceeds the "
            f"hyp pool's {reservation.hyp_s1_pgtable_pages} pages"
        )
    geometry = PageGeometry(reservation.page_size)
    if config.kernel.vmemmap_reservation is VmemmapReservation.ALL_MEMORY:
        vmemmap_pages = reservation.vmemmap_pages  # all memory, region by region
    else:
        vmemmap_pages = vmemmap_backing_pages(
            reservation.carveout_base, reservation.carveout_end, reservation.entry_bytes,
            geometry,
        )
    sizes: list[tuple[str, int]] = [("vmemmap", vmemmap_pages)]
    if reservation.vm_table_pages:
        sizes.append(("vm_table", reservation.vm_table_pages))
    sizes.append(("hyp", reservation.hyp_s1_pgtable_pages))
    sizes += reservation.host_s2_pools
    if reservation.ffa_proxy_pages:
        sizes.append(("ffa_proxy", reservation.ffa_proxy_pages))
    used_pages = sum(nr for _, nr in sizes)
    if used_pages > reservation.reserved_pages:
        raise ValueError(
            f"carve-out of {reservation.reserved_pages} pages cannot hold {used_pages} "
            "(__pkvm_init would fail with -ENOMEM)"
        )
    sizes.append(("slack", reservation.reserved_pages - used_pages))

    base_pfn = reservation.carveout_base // reservation.page_size
    regions: list[CarveoutRegion] = []
    next_pfn = base_pfn
    for name, nr_pages in sizes:
        regions.append(CarveoutRegion(name, next_pfn, nr_pages, reservation.page_size))
        next_pfn += nr_pages
    return CarveoutLayout(
        profile=reservation.profile,
        page_size=reservation.page_size,
        base_pfn=base_pfn,
        nr_pages=reservation.reserved_pages,
        regions=tuple(regions),
        hyp_reserved_pages=early_pages,
    )
