"""`pkvm-sim draw`: a picture of a running simulator's memory.

    pkvm-sim draw --target 127.0.0.1:50051 --out machine.png
    pkvm-sim draw --target 127.0.0.1:50051 --out machine.svg --pool hyp --pool vm/4096
    pkvm-sim draw --target host:50051 --ca-file ca.pem --out machine.png       # TLS

One GetMemoryMap call (read-only, through the SDK's `Hypervisor.memory_map`) gives the
memblocks, the carve-out's regions and every free block of the pools asked for (default: the
hyp pool and the host stage-2 pool(s)); the picture is tools/plots.py's `draw_machine`.
TLS and client-token options are the SDK's (tools/connect.py).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from .connect import add_connection_arguments, connect

if TYPE_CHECKING:
    from pkvm_client import Hypervisor

    from .plots import MachineLayout

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", required=True, metavar="HOST:PORT",
                        help="the running service's gRPC address")
    parser.add_argument("--out", required=True, metavar="FILE.png|FILE.svg",
                        help="where to write the picture (format from the suffix)")
    parser.add_argument("--pool", action="append", default=None, metavar="NAME",
                        help="a pool to draw, repeatable (default: hyp and host stage-2)")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="S",
                        help="seconds to wait for the service (default 10)")
    add_connection_arguments(parser)


def fetch_machine(hv: Hypervisor, target: str, pools: list[str],
                  timeout: float) -> MachineLayout:
    """The service's memory map as plots.MachineLayout."""
    from .plots import MachineLayout, PoolLayout

    hv.wait_ready(timeout)
    answer = hv.memory_map(pools)
    info = hv.reserve()
    return MachineLayout(
        page_size=answer.page_size,
        memblocks=tuple((m.base, m.size) for m in answer.memblocks),
        carveout_base=answer.carveout_base,
        carveout_bytes=answer.carveout_bytes,
        carveout=tuple((r.name, r.base_pfn, r.nr_pages) for r in answer.carveout),
        pools=tuple(
            PoolLayout(
                name=p.name, base_pfn=p.base_pfn, nr_pages=p.nr_pages,
                reserved_pages=p.reserved_pages, admitted_pages=p.admitted_pages,
                free_blocks=tuple(zip(p.free_block_pfns, p.free_block_orders, strict=True)),
            )
            for p in answer.pools
        ),
        title=f"pkvm-sim at {target}: {info.profile}, {info.hyp_page_layout}-byte hyp_page, "
              f"{info.page_size // 1024} KiB pages",
    )


def run(args: argparse.Namespace) -> int:
    from pkvm_client import PkvmError

    from .plots import PlotError, check_output, draw_machine

    try:
        out = check_output(args.out)
    except PlotError as error:
        print(f"draw: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with connect(args.target, args, timeout=args.timeout) as hv:
            machine = fetch_machine(hv, args.target, args.pool or [], args.timeout)
    except (OSError, ValueError) as error:
        print(f"draw: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except PkvmError as error:
        print(f"draw: error: {args.target}: {error.code.name}: {error}", file=sys.stderr)
        return EXIT_ERROR
    try:
        draw_machine(machine, out)
    except PlotError as error:
        print(f"draw: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    print(f"draw: wrote {out}")
    return EXIT_OK
