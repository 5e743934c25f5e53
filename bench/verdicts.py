"""The quality targets' verdicts, printed the same way by every benchmark."""

from __future__ import annotations

from collections.abc import Sequence


def p99(samples: Sequence[float]) -> float:
    ordered = sorted(samples)
    return ordered[max(0, int(len(ordered) * 0.99) - 1)]


def report(verdicts: Sequence[tuple[str, bool]]) -> list[str]:
    """Print one line per target; the targets missed."""
    for target, met in verdicts:
        print(f"target {target}: {'met' if met else 'MISSED'}")
    return [target for target, met in verdicts if not met]
