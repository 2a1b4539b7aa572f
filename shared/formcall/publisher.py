"""Publishing to QStash with the official client: call-form messages, batches, cancels, schedule.

Every call-form message carries the same flow-control key, so QStash itself keeps deliveries
within Vapi's account-wide concurrent-call limit, and the failure callback, so a message QStash
gives up on is recorded on its form.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime

from formcall.errors import ConfigurationError, TransientFailure

# QStash's batch endpoint takes at most 100 messages per request.
BATCH_LIMIT = 100
# Extra attempts per call-form message; QStash waits ~12 s, 2.5 min, 30 min, 6 h, 24 h between them.
CALL_RETRIES = 5
FLOW_CONTROL_KEY = "formcall-vapi-calls"
# QStash's longest flow-control period: a week, in seconds.
MAX_FLOW_PERIOD = 7 * 24 * 3600


@dataclass(frozen=True)
class CallMessage:
    """One call-form message: for `form_id`, not before `not_before`, deduplicated by `dedup_id`."""

    form_id: str
    dedup_id: str
    not_before: datetime | None = None


def flow_control(max_concurrency: int, calls_per_minute: int, *, ledger: bool = False) -> dict:
    """QStash flow control keeping call starts within Vapi's lines.

    With the line ledger the database holds the lines: QStash only bounds deliveries in flight
    (parallelism), with no start rate, so a freed line's wake-up (and the deliveries a wake made
    redundant, which are answered at once) never wait for a rate period.

    Parallelism bounds deliveries in flight, but a call-form delivery ends when Vapi answers,
    long before the call does; what keeps the lines from overflowing is the start rate. QStash
    may start a whole period's `rate` deliveries in the same instant, so the rate must fit the
    lines, and a call (lines x 60 / calls_per_minute seconds long) may overlap the starts of
    as many periods as it spans. Of the whole-second periods that hold every call's window to
    `max_concurrency` starts, this takes the fastest rate no faster than `calls_per_minute`,
    and the shortest period for it (starts spread out: one per 6 s rather than ten a minute).
    """
    if ledger:
        return {"key": FLOW_CONTROL_KEY, "parallelism": max_concurrency}
    best_rate, best_period = 0, 1
    span = math.ceil(max_concurrency * 60 / calls_per_minute)  # a call's seconds, rounded up
    for period in range(1, min(MAX_FLOW_PERIOD, 2 * span) + 1):
        periods_per_call = -(-max_concurrency * 60 // (calls_per_minute * period))
        rate = min(max_concurrency // periods_per_call, calls_per_minute * period // 60)
        if rate * best_period > best_rate * period:
            best_rate, best_period = rate, period
            if rate * 60 == calls_per_minute * period:  # as fast as asked: no period does better
                break
    return {
        "key": FLOW_CONTROL_KEY,
        "parallelism": max_concurrency,
        "rate": best_rate,
        "period": best_period,
    }


class QStashPublisher:
    def __init__(
        self,
        *,
        url: str,
        token: str,
        failure_callback_url: str | None = None,
        flow: dict | None = None,
    ) -> None:
        from qstash import QStash  # imported on first use: only publishing functions pay for it

        # The client retries only requests that raised (connection errors): safe, since every
        # call-form message carries a deduplication id and schedules are upserts by id.
        self._client = QStash(
            token,
            base_url=url,
            retry={"retries": 2, "backoff": lambda attempt: 200 * (attempt + 1)},
        )
        self._failure_callback_url = failure_callback_url
        self._flow = flow

    def _options(self, message: CallMessage) -> dict:
        options: dict = {"retries": CALL_RETRIES, "deduplication_id": message.dedup_id}
        if message.not_before is not None:
            # Whole seconds, rounded up: never before the deadline or the window's opening.
            options["not_before"] = math.ceil(message.not_before.timestamp())
        if self._failure_callback_url:
            options["failure_callback"] = self._failure_callback_url
        if self._flow:
            options["flow_control"] = self._flow
        return options

    def publish_call(self, message: CallMessage, *, destination: str) -> str:
        """Publish one call-form message; returns its QStash message id."""
        with _qstash_errors():
            response = self._client.message.publish_json(
                url=destination, body={"formId": message.form_id}, **self._options(message)
            )
        if isinstance(response, list):  # a URL group's answer: never formcall's destinations
            raise TransientFailure("QStash answered for a URL group", cause="url-group")
        return response.message_id

    def enqueue_calls(self, messages: Iterable[CallMessage], *, destination: str) -> int:
        """Send call-form messages, 100 per batch request; returns how many were accepted."""
        messages = list(messages)
        accepted = 0
        for start in range(0, len(messages), BATCH_LIMIT):
            chunk = messages[start : start + BATCH_LIMIT]
            with _qstash_errors():
                responses = self._client.message.batch_json(
                    [
                        {"url": destination, "body": {"formId": m.form_id}, **self._options(m)}
                        for m in chunk
                    ]
                )
            accepted += len(responses)
        return accepted

    def cancel(self, message_id: str) -> bool:
        """Cancel a message; False when QStash no longer has it (delivered, cancelled, unknown)."""
        from qstash.errors import QStashError

        try:
            with _qstash_errors(passthrough=QStashError):
                self._client.message.cancel(message_id)
        except QStashError as exc:
            if "status: 404" in str(exc):
                return False
            raise TransientFailure("QStash unavailable", cause=type(exc).__name__) from exc
        return True

    def form_of_message(self, message_id: str) -> str | None:
        """The formId a message QStash still holds will deliver; None once gone (or not ours)."""
        import json

        from qstash.errors import QStashError

        try:
            with _qstash_errors(passthrough=QStashError):
                message = self._client.message.get(message_id)
        except QStashError as exc:
            if "status: 404" in str(exc):
                return None
            raise TransientFailure("QStash unavailable", cause=type(exc).__name__) from exc
        try:
            form_id = json.loads(message.body or "").get("formId")
        except (ValueError, AttributeError):
            return None
        return form_id if isinstance(form_id, str) else None

    def upsert_schedule(self, *, schedule_id: str, destination: str, cron: str) -> dict:
        with _qstash_errors():
            self._client.schedule.create(
                destination=destination, cron=cron, schedule_id=schedule_id, retries=3
            )
            schedule = self._client.schedule.get(schedule_id)
        return {
            "scheduleId": schedule.schedule_id,
            "cron": schedule.cron,
            "destination": schedule.destination,
        }


@contextmanager
def _qstash_errors(passthrough: type[Exception] | None = None):
    """Map the client's failures: a refused token is configuration, anything else is transient."""
    import httpx
    from qstash.errors import QStashError

    try:
        yield
    except QStashError as exc:
        if "status: 401" in str(exc) or "status: 403" in str(exc):
            raise ConfigurationError(["QSTASH_TOKEN"], "QStash refused QSTASH_TOKEN") from exc
        if passthrough is not None and isinstance(exc, passthrough):
            raise
        raise TransientFailure("QStash unavailable", cause=type(exc).__name__) from exc
    except httpx.HTTPError as exc:
        raise TransientFailure("QStash unreachable", cause=type(exc).__name__) from exc
    except (KeyError, ValueError) as exc:
        # An answer the client could not parse (e.g. a batch element that failed).
        raise TransientFailure("QStash answer not understood", cause=type(exc).__name__) from exc
