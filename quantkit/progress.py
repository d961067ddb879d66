"""Progress display: a bar over samples on a terminal, silent otherwise or when asked to be quiet."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm import tqdm


def interactive(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


def sample_bar(total: int | None, desc: str, quiet: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="sample", disable=not interactive(quiet), leave=False, dynamic_ncols=True)


class StepTimer:
    """Per-step wall times, reported in the summary (and to stderr as each step ends, on a TTY)."""

    def __init__(self, quiet: bool = True) -> None:
        self.quiet = quiet
        self.times: dict[str, float] = {}

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = time.perf_counter() - start
            if interactive(self.quiet):
                print(f"  {name}: {self.times[name]:.2f} s", file=sys.stderr)
