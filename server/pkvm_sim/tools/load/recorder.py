"""What a run measured: latency histograms per operation (HdrHistogram), outcomes by gRPC
code and reason, throughput and errors per second, and pool pressure sampled from GetStats.

All times are seconds from the start of measurement (the end of the warm-up). The asyncio
runner records from one thread, so nothing here takes a lock.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]

from .sdk import Refusal, ServerFigures
from .workloads import is_expected

LOWEST_US = 1
HIGHEST_US = 3_600_000_000  # one hour: anything slower is recorded as one hour (and counted)
SIGNIFICANT_DIGITS = 3
OK = "OK"
# Latency over time keeps, per second, a sparse histogram of log buckets this many per
# decade (each ~12% wide): p50 and p99 of every second to within a bucket, a few hundred
# bytes a second however long the run (an HdrHistogram per second would be ~25 KiB).
BUCKETS_PER_DECADE = 20


def new_histogram() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS)


@dataclass
class PoolSample:
    t: float
    server: ServerFigures


@dataclass
class Second:
    """Outcomes completed in one second of the run."""

    ok: int = 0
    expected: int = 0
    unexpected: int = 0


@dataclass
class SecondLatency:
    """Latencies of the operations that completed in one second of the run."""

    buckets: Counter[int] = field(default_factory=Counter)  # log bucket -> operations
    max_us: int = 0
    total_us_by_op: Counter[str] = field(default_factory=Counter)
    count_by_op: Counter[str] = field(default_factory=Counter)

    def add(self, op: str, micros: int, count: int) -> None:
        self.buckets[bucket_of(micros)] += count
        self.max_us = max(self.max_us, micros)
        self.total_us_by_op[op] += micros * count
        self.count_by_op[op] += count

    def percentile_us(self, q: float) -> float:
        """The upper edge of the bucket holding the q-th percentile (never above the max)."""
        wanted = math.ceil(sum(self.buckets.values()) * q / 100)
        seen = 0
        for bucket in sorted(self.buckets):
            seen += self.buckets[bucket]
            if seen >= max(1, wanted):
                return min(float(self.max_us), 10 ** ((bucket + 1) / BUCKETS_PER_DECADE))
        return float(self.max_us)

    def mean_us(self, op: str) -> float:
        return self.total_us_by_op[op] / self.count_by_op[op]


def bucket_of(micros: int) -> int:
    return math.floor(math.log10(max(1, micros)) * BUCKETS_PER_DECADE)


@dataclass
class Recorder:
    histograms: dict[str, HdrHistogram] = field(default_factory=dict)
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)  # (op, code/reason)
    seconds: defaultdict[int, Second] = field(default_factory=lambda: defaultdict(Second))
    latency_seconds: defaultdict[int, SecondLatency] = field(
        default_factory=lambda: defaultdict(SecondLatency))
    samples: list[PoolSample] = field(default_factory=list)
    clamped: int = 0  # latencies above HIGHEST_US
    measured_ops: int = 0

    def record(self, op: str, latency_s: float, t: float, refusal: Refusal | None,
               count: int = 1) -> None:
        """`count` operations of `op` finished at `t` after `latency_s`, all with one
        outcome (an Execute batch records each of its outcomes with the batch latency)."""
        histogram = self.histograms.get(op)
        if histogram is None:
            histogram = self.histograms[op] = new_histogram()
        micros = max(LOWEST_US, round(latency_s * 1e6))
        if micros > HIGHEST_US:
            self.clamped += count
            micros = HIGHEST_US
        histogram.record_value(micros, count)
        self.outcomes[(op, OK if refusal is None else refusal.key)] += count
        self.latency_seconds[max(0, int(t))].add(op, micros, count)
        second = self.seconds[max(0, int(t))]
        if refusal is None:
            second.ok += count
        elif is_expected(op, refusal):
            second.expected += count
        else:
            second.unexpected += count
        self.measured_ops += count

    def overall(self) -> HdrHistogram:
        """Every operation's latencies in one histogram."""
        merged = new_histogram()
        for histogram in self.histograms.values():
            merged.add(histogram)
        return merged

    def split_outcomes(self) -> tuple[dict[str, int], dict[str, int]]:
        """(expected refusals, unexpected refusals), each keyed "op: CODE/REASON"."""
        expected: dict[str, int] = {}
        unexpected: dict[str, int] = {}
        for (op, key), n in sorted(self.outcomes.items()):
            if key == OK:
                continue
            code, _sep, reason = key.partition("/")
            target = expected if is_expected(op, Refusal(code, reason)) else unexpected
            target[f"{op}: {key}"] = n
        return expected, unexpected

    def codes(self) -> dict[str, int]:
        codes: Counter[str] = Counter()
        for (_op, key), n in self.outcomes.items():
            codes[key.partition("/")[0]] += n
        return dict(sorted(codes.items()))
