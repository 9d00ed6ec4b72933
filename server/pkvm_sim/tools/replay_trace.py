"""`pkvm-sim replay-trace`: replay `hyp-pool-trace/1` oracle traces against `HypPool`.

A trace records the real v5.14 EL2 allocator (see tests/data/oracle/README.md). Replaying builds
the pool from the header exactly as the kernel's hyp_pool_init would (C u32 arithmetic
included), runs every operation, and compares each result, each refcount_after and every
free-list snapshot. The first mismatch is the divergence, reported with its line number.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import PkvmError
from ..core.hyp_pool import HypPool
from ..core.layout import LAYOUT_2, LAYOUT_4, LAYOUT_32
from ..core.physmem import PhysicalMemory
from ..core.vmemmap import Vmemmap

TRACE_FORMAT = "hyp-pool-trace/1"
# struct hyp_page as the trace's HYP_NO_ORDER reveals it (v5.14 records u16 fields: 65535).
_LAYOUT_BY_NO_ORDER = {lay.no_order: lay for lay in (LAYOUT_4, LAYOUT_32, LAYOUT_2)}


@dataclass(frozen=True)
class Divergence:
    line: int
    message: str


@dataclass(frozen=True)
class ReplayResult:
    path: str
    name: str
    operations: int
    divergence: Divergence | None

    @property
    def ok(self) -> bool:
        return self.divergence is None

    def summary(self) -> str:
        if self.ok:
            return f"PASS {self.name}: {self.operations} operations ({self.path})"
        d = self.divergence
        assert d is not None
        return f"FAIL {self.name}: line {d.line}: {d.message} ({self.path})"


class _Diverged(Exception):
    pass


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as stream:
        for number, line in enumerate(stream, start=1):
            if line.strip():
                yield number, json.loads(line)


def pool_from_header(header: dict[str, Any]) -> HypPool:
    """hyp_pool_init from a trace header, over a vmemmap covering just the pool."""
    if header.get("format") != TRACE_FORMAT:
        raise _Diverged(f"not a {TRACE_FORMAT} trace: format={header.get('format')!r}")
    constants, spec = header["constants"], header["pool"]
    layout = _LAYOUT_BY_NO_ORDER.get(constants.get("HYP_NO_ORDER", LAYOUT_4.no_order))
    if layout is None:
        raise _Diverged(f"unsupported HYP_NO_ORDER {constants['HYP_NO_ORDER']}")
    base, nr_pages = spec["base_pfn"], spec["nr_pages"]
    pool = HypPool(
        Vmemmap(layout, [(base, nr_pages)]),
        PhysicalMemory(),
        base,
        nr_pages,
        spec["reserved_pages"],
        page_shift=constants.get("PAGE_SHIFT", 12),
        max_order_cap=constants.get("MAX_ORDER", 11),
        u32_arithmetic=True,
        name=header.get("name", "trace"),
    )
    if "max_order" in spec and spec["max_order"] != pool.max_order:
        raise _Diverged(
            f"max_order: trace says {spec['max_order']}, pool computed {pool.max_order}"
        )
    return pool


def _expect(what: str, expected: Any, actual: Any) -> None:
    if expected != actual:
        raise _Diverged(f"{what}: expected {expected!r}, got {actual!r}")


def _compare_free_lists(pool: HypPool, recorded: dict[str, list[int]]) -> None:
    for order in range(max(pool.max_order, len(recorded))):
        expected = recorded.get(str(order), [])
        actual = pool.free_list(order) if order < pool.max_order else []
        if expected != actual:
            raise _Diverged(
                f"free list {order}: expected {_head(expected)} ({len(expected)} blocks),"
                f" got {_head(actual)} ({len(actual)} blocks)"
            )


def _head(blocks: list[int]) -> str:
    return str(blocks[:8])[:-1] + (", ...]" if len(blocks) > 8 else "]")


def _compare_counts(pool: HypPool, recorded: dict[str, int]) -> None:
    actual = pool.statistics().free_blocks_per_order
    for order in range(max(pool.max_order, len(recorded))):
        _expect(f"free_counts[{order}]", recorded.get(str(order), 0),
                actual[order] if order < len(actual) else 0)


def _compare_final(pool: HypPool, record: dict[str, Any]) -> None:
    _compare_free_lists(pool, record["free_lists"])
    _expect("free_pages", record["free_pages"], pool.free_pages)
    counts = [pool.refcount(p) for p in range(pool.base_pfn, pool.end_pfn)]
    nonzero = [c for c in counts if c]
    _expect("refcounts_nonzero", record["refcounts_nonzero"], len(nonzero))
    _expect("refcount_sum", record["refcount_sum"], sum(nonzero))
    held = [[p, c, o] for p, c, o in pool.held_blocks()]
    _expect("allocated", record["allocated"], held)


def _step(pool: HypPool, record: dict[str, Any]) -> None:
    op = record["op"]
    if op == "alloc":
        _expect(f"alloc(order {record['order']})", record["result"],
                pool.try_alloc_pages(record["order"]))
    elif op in ("put", "get"):
        after = pool.put_page(record["pfn"]) if op == "put" else pool.get_page(record["pfn"])
        _expect(f"{op}({record['pfn']}) refcount_after", record["refcount_after"], after)
    elif op == "check":
        _compare_free_lists(pool, record["free_lists"])
    elif op == "checkpoint":
        _compare_counts(pool, record["free_counts"])
    elif op == "final":
        _compare_final(pool, record)
    else:
        raise _Diverged(f"unknown op {op!r}")


def replay(path: str | Path) -> ReplayResult:
    """Replay one trace file; never raises for a divergence, only reports it."""
    path = Path(path)
    name, operations, line = path.name, 0, 0
    try:
        records = _records(path)
        line, header = next(records)
        name = header.get("name", name)
        pool = pool_from_header(header)
        saw_final = False
        for line, record in records:  # noqa: B007 (line is reported on divergence)
            _step(pool, record)
            operations += record["op"] in ("alloc", "put", "get")
            saw_final = record["op"] == "final"
        if not saw_final:
            raise _Diverged("trace has no final record (truncated?)")
    except _Diverged as exc:
        return ReplayResult(str(path), name, operations, Divergence(line, str(exc)))
    except PkvmError as exc:
        return ReplayResult(str(path), name, operations,
                            Divergence(line, f"allocator refused: {exc.reason}: {exc.message}"))
    except (OSError, ValueError, KeyError, StopIteration) as exc:
        return ReplayResult(str(path), name, operations,
                            Divergence(line, f"unreadable trace: {type(exc).__name__}: {exc}"))
    return ReplayResult(str(path), name, operations, None)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE",
                        help="hyp-pool-trace/1 files (.jsonl or .jsonl.gz)")


def run(args: argparse.Namespace) -> int:
    results = [replay(f) for f in args.files]
    for result in results:
        print(result.summary())
    failed = sum(not r.ok for r in results)
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pkvm-sim replay-trace", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
