"""Shared helpers for the benchmarks: machine facts, interleaved rounds, min/median/max."""

from __future__ import annotations

import datetime as dt
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))


@dataclass
class Series:
    name: str
    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def row(self, unit: str, fmt: str = "{:.2f}") -> str:
        lo, mid, hi = min(self.values), self.median, max(self.values)
        return f"| {self.name} | {fmt.format(lo)} | {fmt.format(mid)} | {fmt.format(hi)} | {unit} |"


def interleave(contenders: dict[str, Callable[[], float]], rounds: int = ROUNDS) -> dict[str, Series]:
    """Run each contender once per round, in turn (A B C A B C ...); each returns its own figure."""
    out = {name: Series(name) for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            out[name].values.append(fn())
    return out


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def machine() -> str:
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC · {cpu} · {os.cpu_count()} cores · "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads) · transformers {transformers.__version__} · "
        f"Python {platform.python_version()}"
    )


TABLE_HEAD = "| what | min | median | max | unit |\n|---|---|---|---|---|"
