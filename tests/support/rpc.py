"""A fake Rpc for formcall.store.FormStore: scripted JSON answers per SQL function.

The answers have the shapes the SQL functions of supabase/migrations return, and every
call is checked against the function's parameter names in the migrations, so a store that
asks for a function or an argument the database does not have fails the test.
"""

from __future__ import annotations

import re
from collections import defaultdict, deque
from datetime import datetime
from pathlib import Path
from typing import Any

MIGRATIONS = Path(__file__).resolve().parents[2] / "supabase" / "migrations"
_FUNCTION = re.compile(
    r"create or replace function public\.(\w+)\s*\((.*?)\)\s*returns", re.IGNORECASE | re.DOTALL
)


def sql_functions() -> dict[str, set[str]]:
    """Each SQL function of the migrations and its parameter names (the last definition wins)."""
    functions: dict[str, set[str]] = {}
    for path in sorted(MIGRATIONS.glob("*.sql")):
        for name, params in _FUNCTION.findall(path.read_text()):
            functions[name] = {
                part.split()[0]
                for part in re.split(r",(?![^(]*\))", params)
                if part.strip().startswith("p_")
            }
    return functions


def _json(value: Any) -> Any:
    """What a JSON answer carries: timestamps as ISO text, tuples as lists."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json(v) for v in value]
    return value


class ScriptedRpc:
    """Answers each SQL function from its queue (then its standing answer); records every call.

    An answer that is an exception is raised (e.g. DatabaseUnavailable); a function with no
    answer scripted fails the test, so nothing is called that the test did not expect.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self._queues: dict[str, deque] = defaultdict(deque)
        self._standing: dict[str, Any] = {}
        self._functions = sql_functions()

    def answer(self, function: str, *answers: Any) -> ScriptedRpc:
        """Queue answers for the next calls of `function`, in order."""
        self._check_name(function)
        self._queues[function].extend(answers)
        return self

    def always(self, function: str, answer: Any) -> ScriptedRpc:
        """The answer for every call of `function` once its queue is empty."""
        self._check_name(function)
        self._standing[function] = answer
        return self

    def __call__(self, function: str, params: dict[str, Any]) -> Any:
        self._check_name(function)
        unknown = set(params) - self._functions[function]
        assert not unknown, f"{function} has no parameters {sorted(unknown)}"
        self.calls.append((function, dict(params)))
        if self._queues[function]:
            answer = self._queues[function].popleft()
        elif function in self._standing:
            answer = self._standing[function]
        else:
            raise AssertionError(f"unexpected call of {function}({params})")
        if isinstance(answer, BaseException):
            raise answer
        return _json(answer)

    def params(self, function: str) -> list[dict[str, Any]]:
        """The arguments of every call of `function`, in order."""
        return [params for name, params in self.calls if name == function]

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def _check_name(self, function: str) -> None:
        assert function in self._functions, f"no SQL function {function} in the migrations"


# The JSON answers of claim_form_call (supabase/migrations/20261201000001_call_outcomes.sql).


def claimed(
    call_id: str,
    form_ids: list[str],
    *,
    claimed_at: datetime,
    deadline: datetime,
    name: str = "Ada Patient",
    phone: str = "+15550100",
    timezone: str = "UTC",
) -> dict:
    return {
        "outcome": "claimed",
        "call_id": call_id,
        "claimed_at": claimed_at,
        "forms": [
            {"id": form_id, "title": f"Form {n}", "deadline": deadline, "call_attempts": 1}
            for n, form_id in enumerate(form_ids, 1)
        ],
        "patient": {"id": "patient-1", "name": name, "phone": phone, "timezone": timezone},
    }


def skipped(
    reason: str, *, due_in_seconds: float | None = None, open_call: dict | None = None
) -> dict:
    return {
        "outcome": "skipped",
        "reason": reason,
        "due_in_seconds": due_in_seconds,
        "open_call": open_call,
    }


def open_call(
    call_id: str,
    form_ids: list[str],
    *,
    claimed_at: datetime,
    placed: bool = False,
    unknown: bool = True,
) -> dict:
    return {
        "call_id": call_id,
        "claimed_at": claimed_at,
        "placed": placed,
        "unknown": unknown,
        "form_ids": form_ids,
    }


def opted_out(cancel: list[tuple[str, str]]) -> dict:
    return {
        "outcome": "skipped",
        "reason": "opted_out",
        "cancel": [{"form_id": f, "message_id": m} for f, m in cancel],
    }


def capped(reason: str, until: datetime, timezone: str = "UTC") -> dict:
    return {"outcome": "capped", "reason": reason, "until": until, "timezone": timezone}


def no_line(retry_after: int | None) -> dict:
    return {"outcome": "no_line", "retry_after": retry_after}


def schedule_state(
    form_id: str,
    *,
    deadline: datetime | None,
    submitted: bool = False,
    call_status: str = "pending",
    message_id: str | None = None,
    scheduled_deadline: datetime | None = None,
    timezone: str = "UTC",
    due: bool = False,
    next_call_at: datetime | None = None,
    due_at: datetime | None = None,
    opted_out: bool = False,
) -> dict:
    """form_schedule_state's row."""
    return {
        "id": form_id,
        "deadline": deadline,
        "submitted": submitted,
        "call_status": call_status,
        "qstash_message_id": message_id,
        "scheduled_deadline": scheduled_deadline,
        "timezone": timezone,
        "due": due,
        "next_call_at": next_call_at,
        "due_at": due_at or deadline,
        "opted_out": opted_out,
    }


def recorded_event(
    call_id: str,
    *,
    ended: bool = False,
    outcome: str | None = None,
    follow_ups: list[dict] = (),
    cancel: list[tuple[str, str]] = (),
    opted_out: bool | None = None,
) -> dict:
    """record_call_event's answer for a call formcall placed (an opt-out when it cancels)."""
    return {
        "status": "recorded",
        "call_id": call_id,
        "ended": ended,
        "duplicate": False,
        "outcome": outcome,
        "follow_ups": list(follow_ups),
        "opted_out": bool(cancel) if opted_out is None else opted_out,
        "cancel": [{"form_id": f, "message_id": m} for f, m in cancel],
    }


RECORDED = {"recorded": True}
RELEASED = {"released": True}
