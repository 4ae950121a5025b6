"""Counting what a `prepare` run dropped, clipped or skipped, with a first example of each, for the summary
printed at the end and the `dropped` record in dataset.yaml."""

from __future__ import annotations

from collections import Counter


class Tally:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, str] = {}

    def add(self, reason: str, example: str | None = None, n: int = 1) -> None:
        self.counts[reason] += n
        if example is not None and reason not in self.examples:
            self.examples[reason] = example

    def __getitem__(self, reason: str) -> int:
        return self.counts[reason]

    def as_dict(self) -> dict[str, dict[str, object]]:
        return {r: {"count": c, **({"example": self.examples[r]} if r in self.examples else {})}
                for r, c in sorted(self.counts.items())}
