"""Powertools Logger and Metrics, one of each per container (JSON logs, CloudWatch EMF metrics)."""

from __future__ import annotations

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit

logger = Logger(service="formcall")
metrics = Metrics(namespace="formcall")


def count(name: str, value: int = 1) -> None:
    """Add to a Count metric (flushed by the Lambda handler's log_metrics)."""
    if value:
        metrics.add_metric(name=name, unit=MetricUnit.Count, value=value)
