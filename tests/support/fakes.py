"""In-memory Vapi caller and QStash publisher that record what the use cases ask of them."""

from __future__ import annotations

from collections import deque
from datetime import datetime
from typing import Any

from formcall.models import PatientCall
from formcall.publisher import CallMessage


def _next(queue: deque, what: str) -> Any:
    assert queue, f"no answer scripted for {what}"
    answer = queue.popleft()
    if isinstance(answer, BaseException):
        raise answer
    return answer


class FakeCaller:
    """formcall.ports.Caller: answers (or raises) what the test scripts, records each request."""

    def __init__(
        self, *, creates: list = (), calls: dict[str, Any] | None = None, finds: list = ()
    ) -> None:
        self._creates = deque(creates)
        self._finds = deque(finds)
        self._calls = dict(calls or {})
        self.created: list[PatientCall] = []
        self.looked_up: list[str] = []
        self.searched: list[tuple[str, datetime, datetime]] = []

    def create_call(self, call: PatientCall) -> tuple[str, str | None]:
        self.created.append(call)
        return _next(self._creates, "create_call")

    def get_call(self, vapi_call_id: str) -> dict[str, Any] | None:
        self.looked_up.append(vapi_call_id)
        assert vapi_call_id in self._calls, f"no record scripted for {vapi_call_id}"
        answer = self._calls[vapi_call_id]
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def find_call_for_form(
        self, form_id: str, *, created_after: datetime, created_before: datetime
    ) -> dict[str, Any] | None:
        self.searched.append((form_id, created_after, created_before))
        return _next(self._finds, "find_call_for_form")


class FakePublisher:
    """formcall.ports.Publisher: records messages, batches, cancels and schedules.

    `fail` maps a method name to an exception it raises (every call), or to a list of
    outcomes taken one per call (an exception is raised, anything else lets the call through).
    """

    def __init__(
        self, *, fail: dict[str, Any] | None = None, holds: dict[str, str] | None = None
    ) -> None:
        # The messages QStash still holds, by id: the form each will deliver (published ones too).
        self.holds: dict[str, str] = dict(holds or {})
        self.published: list[tuple[CallMessage, str]] = []
        self.batches: list[tuple[list[CallMessage], str]] = []
        self.cancelled: list[str] = []
        self.schedules: list[dict[str, str]] = []
        self.builds = 0  # how often factory() was asked for the publisher
        self._fail = {
            name: deque(v) if isinstance(v, list) else v for name, v in (fail or {}).items()
        }
        self._ids = 0

    def factory(self) -> FakePublisher:
        """What the use cases take as `publisher` where they build it only when needed."""
        self.builds += 1
        return self

    def _maybe_fail(self, method: str) -> None:
        failure = self._fail.get(method)
        if isinstance(failure, deque):
            failure = failure.popleft() if failure else None
        if isinstance(failure, BaseException):
            raise failure

    def publish_call(self, message: CallMessage, *, destination: str) -> str:
        self._maybe_fail("publish_call")
        self.published.append((message, destination))
        self._ids += 1
        self.holds[f"msg_{self._ids}"] = message.form_id
        return f"msg_{self._ids}"

    def form_of_message(self, message_id: str) -> str | None:
        self._maybe_fail("form_of_message")
        return self.holds.get(message_id)

    def enqueue_calls(self, messages: list[CallMessage], *, destination: str) -> int:
        messages = list(messages)
        self._maybe_fail("enqueue_calls")
        self.batches.append((messages, destination))
        return len(messages)

    def cancel(self, message_id: str) -> bool:
        self._maybe_fail("cancel")
        self.cancelled.append(message_id)
        return True

    def upsert_schedule(self, *, schedule_id: str, destination: str, cron: str) -> dict:
        self._maybe_fail("upsert_schedule")
        schedule = {"scheduleId": schedule_id, "destination": destination, "cron": cron}
        self.schedules.append(schedule)
        return schedule
