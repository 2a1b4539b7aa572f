"""The Count metrics a use case added (Powertools keeps them in memory until a handler flushes)."""

from __future__ import annotations

from formcall.observability import metrics


def reset() -> None:
    metrics.clear_metrics()


def counted() -> dict[str, float]:
    """Each metric name and the sum of what was added to it since reset()."""
    return {
        name: sum(entry["Value"]) if isinstance(entry["Value"], list) else entry["Value"]
        for name, entry in metrics.metric_set.items()
    }
