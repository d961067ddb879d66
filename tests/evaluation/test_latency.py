"""Interleaved latency: the sessions take turns run by run, timed on a fake clock (closed form)."""

from __future__ import annotations

import numpy as np

from quantkit.evaluation import latency


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class FakeSession:
    """Costs ``ms_per_item`` per batch item on the fake clock, plus a one-off spike on its 7th run
    (a background hiccup the median must ignore); records the order of the runs."""

    def __init__(self, name: str, ms_per_item: float, clock: FakeClock, order: list[str]) -> None:
        self.name, self.ms_per_item, self.clock, self.order, self.runs = name, ms_per_item, clock, order, 0

    def run(self, _outputs, feeds):
        self.runs += 1
        batch = len(next(iter(feeds.values())))
        spike = 50.0 if self.runs == 7 else 0.0
        self.clock.now += (self.ms_per_item * batch + spike) / 1000
        self.order.append(self.name)


def test_sessions_take_turns_and_each_gets_its_own_median(monkeypatch):
    clock, order = FakeClock(), []
    monkeypatch.setattr(latency.time, "perf_counter", clock.perf_counter)
    sessions = [FakeSession("a", 2.0, clock, order), FakeSession("b", 5.0, clock, order)]
    out = latency.interleaved_batch_ms(sessions, {"x": np.zeros((1, 3), np.float32)}, (1, 4), rounds=2, budget_s=0.1)
    expected = [{1: 2.0, 4: 8.0}, {1: 5.0, 4: 20.0}]
    assert [{b: round(ms, 9) for b, ms in d.items()} for d in out] == expected
    timed = order[6:]  # after 3 warm-up runs each at batch 1
    assert timed[:6] == ["a", "b"] * 3  # turns, run by run
    assert sessions[0].runs == sessions[1].runs  # the same number of runs each
