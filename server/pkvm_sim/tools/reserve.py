"""`pkvm-sim reserve`: what kvm_hyp_reserve would reserve, and how EL2 divides it.

    pkvm-sim reserve                                  # v5.14, one 4 GiB memblock
    pkvm-sim reserve --profile v5.13 --memblock 0x80000000:2G --memblock 0x880000000:6G
    pkvm-sim reserve --compare                        # v5.13 vs v5.14 side by side
    pkvm-sim reserve --json                           # the six figures as one JSON object

The numbers come from `pkvm_sim.core.reservation`; this module only parses and renders.
Configuration errors (from SimConfig or the reservation) go to stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from pkvm_sim.core.config import SimConfig
from pkvm_sim.core.layout import GIB, KIB, MIB
from pkvm_sim.core.profiles import (
    VmemmapReservation,
    kernel_profile_names,
    profile_spec,
    profiles_epilog,
)
from pkvm_sim.core.reservation import (
    CarveoutLayout,
    Reservation,
    compare_profiles,
    compute_reservation,
    partition_carveout,
)
from pkvm_sim.knobs import add_sim_arguments

EXIT_OK = 0
EXIT_USAGE = 2
DEFAULT_COMPARE = "v5.13,v5.14"  # the series' before and after

# The machine knobs reserve takes, declared once in pkvm_sim/knobs.py (flags, help, defaults).
# Values stay strings: SimConfig.from_mapping validates them, as for `serve`.
RESERVE_KNOBS = (
    "memblocks", "profile", "page_size", "hyp_page_layout", "vmemmap_coverage",
    "carveout_base", "hyp_pool_extra_pages",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the reserve flags; every default is SimConfig's (None = not given)."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = profiles_epilog()
    add_sim_arguments(parser, only=RESERVE_KNOBS)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--compare", nargs="?", const=DEFAULT_COMPARE, metavar="P1,P2,...",
        help="profiles side by side on the same memory map, oldest first "
        f"(default {DEFAULT_COMPARE}; 'all' = {','.join(kernel_profile_names())})",
    )
    parser.add_argument(  # observe: pictures live in tools/plots.py
        "--plot", metavar="FILE.png|FILE.svg",
        help="with --compare: also draw the carve-out per profile as stacked bars",
    )


def run(args: argparse.Namespace) -> int:
    """Compute and print; returns the exit code (2 on a configuration error)."""
    try:
        config = config_from_args(args)
        if args.compare:
            _warn_ignored_by_compare(args)
            reservations = compare_profiles(config, parse_profile_list(args.compare))
            if getattr(args, "plot", None):
                from .plots import plot_reservations

                plot_reservations(reservations, args.plot)
            output = (
                render_compare_json(*reservations) if args.json
                else render_compare(*reservations)
            )
        else:
            reservation = compute_reservation(config)
            layout = partition_carveout(reservation, config)
            output = render_json(reservation) if args.json else render_table(reservation, layout)
    except ValueError as error:
        print(f"reserve: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(output)
    return EXIT_OK


def config_from_args(args: argparse.Namespace) -> SimConfig:
    values = {name: getattr(args, name) for name in RESERVE_KNOBS}
    return SimConfig.from_mapping({k: v for k, v in values.items() if v is not None})


def parse_profile_list(text: str) -> list[str]:
    """'v5.13,v6.12' -> the profile names (validated), at least two, no repeats; 'all' ->
    every released kernel's profile, oldest first (extension profiles such as
    v6.12+guest-share reserve as their base profile)."""
    if text.strip() == "all":
        return list(kernel_profile_names())
    names = [name.strip() for name in text.split(",") if name.strip()]
    for name in names:
        profile_spec(name)  # ValueError naming the known profiles
    if len(names) < 2 or len(set(names)) != len(names):
        raise ValueError(f"--compare needs two or more different profiles, not {text!r}")
    return names


def _warn_ignored_by_compare(args: argparse.Namespace) -> None:
    for dest in ("profile", "hyp_page_layout"):
        if getattr(args, dest, None) is not None:
            flag = "--" + dest.replace("_", "-")
            print(
                f"reserve: note: {flag} is ignored with --compare "
                "(each profile uses its own hyp_page layout)",
                file=sys.stderr,
            )


# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------


def hex_address(value: int) -> str:
    """0x1_7EA0_0000: upper-case hex, underscores every 4 digits."""
    return f"0x{value:_X}"


def human_bytes(value: int) -> str:
    """Exact binary units when they divide (8 MiB, 512 KiB), else MiB with 2 decimals."""
    for unit, name in ((GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")):
        if value >= unit and value % unit == 0:
            return f"{value // unit} {name}"
    if value >= MIB:
        return f"{value / MIB:.2f} MiB"
    return f"{value} B"


def _mib(pages: int, page_size: int) -> str:
    return f"{pages * page_size / MIB:.2f}"


def _page_size_name(page_size: int) -> str:
    return f"{page_size // KIB}K"


def render_json(reservation: Reservation) -> str:
    return json.dumps(reservation.to_json_dict())


def render_compare_json(*reservations: Reservation) -> str:
    """{profile: the six figures} in the order compared."""
    return json.dumps({r.profile.value: r.to_json_dict() for r in reservations})


_POOL_LABELS = {
    "host_s2": "S2  host stage-2 pool",
    "host_s2_mem": "MEM host stage-2 memory pool",
    "host_s2_dev": "DEV host stage-2 MMIO pool",
}


def _budget_rows(r: Reservation) -> list[tuple[str, int]]:
    rows = [
        ("T   hyp tables for all memory", r.hyp_pgtable_total_pages),
        ("G   1 GiB allowance", r.gib_allowance_pages),
    ]
    if r.hyp_pool_extra_pages:
        rows.append(("    hyp_pool_extra_pages", r.hyp_pool_extra_pages))
    rows.append(("S1  hyp stage-1 pool", r.hyp_s1_pgtable_pages))
    rows += [(_POOL_LABELS[name], pages) for name, pages in r.host_s2_pools]
    if r.vm_table_pages:
        rows.append(("    hyp VM table", r.vm_table_pages))
    if r.ffa_proxy_pages:
        rows.append(("    FF-A proxy pages", r.ffa_proxy_pages))
    vmemmap_rule = (
        "all memory, per memblock"
        if profile_spec(r.profile).vmemmap_reservation is VmemmapReservation.ALL_MEMORY
        else "fixed point"
    )
    rows += [
        ("H   before the vmemmap", r.pre_vmemmap_pages),
        (f"V   vmemmap ({vmemmap_rule})", r.vmemmap_pages),
        ("hyp_mem_pages = H + V", r.hyp_mem_pages),
        ("reserved" + (" (PMD-rounded)" if r.pmd_rounded else " (exact)"), r.reserved_pages),
    ]
    return rows


def _checked_note(r: Reservation) -> list[str]:
    """Whether this profile and page size were checked against a booted kernel (docs/model.md)."""
    booted = profile_spec(r.profile).booted_page_sizes
    if not booted:
        return []
    page = _page_size_name(r.page_size)
    if page in booted:
        return [f"(checked against Debian's {r.profile.value} {page} kernel under QEMU: "
                "pkvm-sim kernel-check)"]
    return [f"(unchecked: no {page} {r.profile.value} kernel was booted; checked for "
            f"{', '.join(booted)})"]


def render_table(r: Reservation, layout: CarveoutLayout) -> str:
    lines = [
        f"profile {r.profile.value}, {_page_size_name(r.page_size)} pages, "
        f"hyp_page layout {r.layout_name} ({r.entry_bytes} B/entry), "
        f"{r.hyp_pgtable_levels}-level table budgets",
        "memblocks:",
        *(
            f"  [{hex_address(b.base)}, {hex_address(b.end)})  {human_bytes(b.size)}"
            for b in r.memblocks
        ),
        "",
        f"  {'budget':<40}{'pages':>8}{'MiB':>10}",
        *(
            f"  {label:<40}{pages:>8}{_mib(pages, r.page_size):>10}"
            for label, pages in _budget_rows(r)
        ),
        "",
        f"vmemmap cost: {human_bytes(r.vmemmap_bytes_per_gib)}/GiB of covered memory",
        f"vmemmap backed for coverage '{r.vmemmap_coverage}': {r.all_memory_vmemmap_pages} "
        f"pages ({_mib(r.all_memory_vmemmap_pages, r.page_size)} MiB)",
        f"vmemmap of all memory, region by region (what v6.2+ reserves): "
        f"{r.vmemmap_region_pages} pages ({_mib(r.vmemmap_region_pages, r.page_size)} MiB)",
        f"Reserved {human_bytes(r.reserved_bytes)} at {hex_address(r.carveout_base)} "
        f"(end {hex_address(r.carveout_end)})",
        *_checked_note(r),
        "",
        "carve-out layout (divide_memory_pool, bump order):",
        f"  {'region':<12}{'base':>16}{'end':>16}{'pages':>8}",
        *(
            f"  {reg.name:<12}{hex_address(reg.base):>16}{hex_address(reg.end):>16}"
            f"{reg.nr_pages:>8}"
            for reg in layout.regions
        ),
    ]
    if layout.hyp_reserved_pages:
        lines.append(f"  (hyp pool: first {layout.hyp_reserved_pages} pages reserved)")
    return "\n".join(lines)


def _compare_rows(rs: Sequence[Reservation]) -> list[tuple[str, ...]]:
    """One row per figure: a label, one cell per profile, and last minus first."""
    first, last = rs[0], rs[-1]

    def pages(label: str, values: Sequence[int]) -> tuple[str, ...]:
        return (label, *(str(v) for v in values), f"{values[-1] - values[0]:+d}")

    def host_s2(r: Reservation) -> str:
        return "+".join(str(pages) for _name, pages in r.host_s2_pools)

    per_gib = [r.vmemmap_bytes_per_gib for r in rs]
    return [
        ("hyp_page entry", *(f"{r.entry_bytes} B" for r in rs),
         f"{last.entry_bytes - first.entry_bytes:+d} B"),
        ("vmemmap per GiB", *(f"{human_bytes(v)}/GiB" for v in per_gib),
         _ratio(per_gib[0], per_gib[-1])),
        pages("table levels budgeted", [r.hyp_pgtable_levels for r in rs]),
        pages("hyp_s1_pgtable_pages", [r.hyp_s1_pgtable_pages for r in rs]),
        ("host_s2_pgtable_pages", *(host_s2(r) for r in rs),
         f"{last.host_s2_pgtable_pages - first.host_s2_pgtable_pages:+d}"),
        pages("vm_table_pages", [r.vm_table_pages for r in rs]),
        pages("ffa_proxy_pages", [r.ffa_proxy_pages for r in rs]),
        pages("vmemmap_pages", [r.vmemmap_pages for r in rs]),
        pages("hyp_mem_pages", [r.hyp_mem_pages for r in rs]),
        ("reserved", *(human_bytes(r.reserved_bytes) for r in rs),
         f"{(last.reserved_bytes - first.reserved_bytes) // last.page_size:+d} pages"),
        ("carve-out base", *(hex_address(r.carveout_base) for r in rs), ""),
        pages("vmemmap pages backed", [r.all_memory_vmemmap_pages for r in rs]),
        pages("vmemmap pages per region", [r.vmemmap_region_pages for r in rs]),
    ]


def _ratio(first: int, last: int) -> str:
    """'/8' when last is first divided by 8, 'x8' when multiplied, '' when equal."""
    if first == last:
        return ""
    if first > last:
        return f"/{first / last:.3g}"
    return f"x{last / first:.3g}"


def render_compare(*reservations: Reservation) -> str:
    rs = list(reservations)
    rows = _compare_rows(rs)
    header = ("", *(r.profile.value for r in rs), f"{rs[-1].profile.value} - {rs[0].profile.value}")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)
        ).rstrip()

    memory = human_bytes(sum(b.size for b in rs[-1].memblocks))
    title = (
        f"{' vs '.join(r.profile.value for r in rs)}: {memory} in {len(rs[-1].memblocks)} "
        f"memblock(s), {_page_size_name(rs[-1].page_size)} pages"
    )
    coverages = sorted({r.vmemmap_coverage for r in rs})
    notes = [
        "",
        "vmemmap_pages: what kvm_hyp_reserve reserves for the vmemmap (the carve-out's own",
        "  entries up to v6.1; all memory, region by region, from v6.2).",
        f"vmemmap pages backed: what vmemmap coverage {' / '.join(coverages)} backs",
        "  (a page shared by two regions counted once); per region: all memory's vmemmap",
        "  summed region by region (a shared page counted twice), as v6.2+ reserves it.",
    ]
    return "\n".join([title, "", line(header), *(line(row) for row in rows), *notes])


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point (`python -m pkvm_sim.tools.reserve`)."""
    parser = argparse.ArgumentParser(prog="pkvm-sim reserve", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
