"""The form store: the SQL functions of supabase/migrations, over Supabase RPC or direct Postgres.

Both paths call the very same SQL functions with the same named arguments; only the
transport differs. Atomicity lives in those functions, not here.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from formcall.errors import DatabaseUnavailable
from formcall.models import (
    CallEvent,
    Claim,
    FollowUp,
    FormOnCall,
    MessageToCancel,
    OpenCall,
    OverdueForm,
    PatientCall,
    RecordedEvent,
    ScheduleState,
    StaleCall,
)


class Jsonb(dict):
    """A dict passed to a jsonb parameter (psycopg needs to be told; PostgREST takes JSON)."""


class Rpc(Protocol):
    def __call__(self, function: str, params: dict[str, Any]) -> Any: ...


class PostgresRpc:
    """Calls a SQL function over psycopg: one autocommit connection per thread, reconnecting."""

    def __init__(self, dsn: str, *, connect_timeout: int = 5) -> None:
        self._dsn = dsn
        self._connect_timeout = connect_timeout
        self._local = threading.local()

    def _connection(self):
        import psycopg

        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            conn = psycopg.connect(
                self._dsn,
                autocommit=True,
                connect_timeout=self._connect_timeout,
                prepare_threshold=None,
            )
            self._local.conn = conn
        return conn

    def __call__(self, function: str, params: dict[str, Any]) -> Any:
        import psycopg
        from psycopg import sql

        query = sql.SQL("select {}({})").format(
            sql.Identifier("public", function),
            sql.SQL(", ").join(
                sql.SQL("{} => {}").format(sql.Identifier(name), sql.Placeholder(name))
                for name in params
            ),
        )
        from psycopg.types.json import Jsonb as PgJsonb

        params = {k: PgJsonb(dict(v)) if isinstance(v, Jsonb) else v for k, v in params.items()}
        kept = getattr(self._local, "conn", None)
        try:
            row = self._connection().execute(query, params).fetchone()
        except psycopg.OperationalError as exc:
            lost = kept is not None and kept.broken
            self._drop_connection()
            if not lost:
                raise DatabaseUnavailable("database unavailable", cause=type(exc).__name__) from exc
            # A kept connection the server closed while it sat idle (a restart, an idle timeout,
            # a pooler recycling it): once more on a new one. Every SQL function is safe to run
            # twice; a claim that did commit answers "in_progress" and the sweep reconciles it.
            try:
                row = self._connection().execute(query, params).fetchone()
            except psycopg.OperationalError as again:
                self._drop_connection()
                raise DatabaseUnavailable(
                    "database unavailable", cause=type(again).__name__
                ) from again
        return row[0] if row else None

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # the connection is already broken; nothing to keep
                pass


class SupabaseRpc:
    """Calls a SQL function through Supabase's REST API (PostgREST `/rest/v1/rpc/<name>`)."""

    def __init__(self, url: str, service_role_key: str) -> None:
        self._url = url
        self._key = service_role_key
        self._client: Any = None
        self._lock = threading.Lock()

    def _supabase(self):
        with self._lock:
            if self._client is None:
                import httpx

                from supabase import ClientOptions, create_client  # ~0.5 s import: this path only

                # Bounded timeouts: a hung request must end well inside the Lambda timeout.
                http = httpx.Client(timeout=httpx.Timeout(10.0, connect=5.0))
                self._client = create_client(
                    self._url, self._key, options=ClientOptions(httpx_client=http)
                )
            return self._client

    def __call__(self, function: str, params: dict[str, Any]) -> Any:
        import httpx
        from postgrest.exceptions import APIError

        try:
            return self._supabase().rpc(function, params).execute().data
        except (httpx.HTTPError, APIError) as exc:
            # Any failure here leaves the database unchanged for this call (one function, one
            # transaction), so it is safe to retry.
            code = getattr(exc, "code", None) or type(exc).__name__
            raise DatabaseUnavailable("database unavailable", cause=str(code)) from exc


def _ts(value: str | datetime) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(value)


def _maybe_ts(value: str | datetime | None) -> datetime | None:
    return None if value is None else _ts(value)


def _cancels(rows: list[dict[str, Any]] | None) -> tuple[MessageToCancel, ...]:
    return tuple(
        MessageToCancel(form_id=r["form_id"], message_id=r["message_id"]) for r in rows or []
    )


@dataclass(frozen=True)
class CallRules:
    """How often formcall may call (clients.call_rules builds it from settings), passed to SQL."""

    max_attempts: int = 5
    max_calls_per_form: int = 3
    follow_up_on: frozenset[str] = frozenset({"no_answer", "busy", "voicemail", "not_connected"})
    follow_up_delay_seconds: int = 86400
    max_per_day: int = 1
    max_per_week: int = 3
    # The line ledger: how many lines formcall may hold (None: no ledger), and for how long a
    # call without a reported end still holds one.
    lines: int | None = None
    max_call_seconds: int = 660
    lease_seconds: int = 60


class FormStore:
    """The call state machine, one method per SQL function."""

    def __init__(self, rpc: Rpc, *, rules: CallRules = CallRules()) -> None:
        self._rpc = rpc
        self.rules = rules

    def claim(self, form_id: str, *, delivery: dict[str, Any] | None = None) -> Claim:
        params: dict[str, Any] = {
            "p_form_id": form_id,
            "p_max_attempts": self.rules.max_attempts,
            "p_max_per_day": self.rules.max_per_day,
            "p_max_per_week": self.rules.max_per_week,
            "p_lines": self.rules.lines,
            "p_max_call_seconds": self.rules.max_call_seconds,
        }
        if delivery is not None:
            params["p_delivery"] = Jsonb(delivery)
        result = self._rpc("claim_form_call", params)
        call = None
        if result["outcome"] == "claimed":
            patient = result["patient"]
            call = PatientCall(
                call_id=result["call_id"],
                patient_id=patient["id"],
                patient_name=patient["name"],
                phone=patient["phone"],
                timezone=patient["timezone"],
                claimed_at=_ts(result["claimed_at"]),
                forms=tuple(
                    FormOnCall(
                        id=f["id"],
                        title=f["title"],
                        deadline=_ts(f["deadline"]),
                        call_attempts=f["call_attempts"],
                    )
                    for f in result["forms"]
                ),
            )
        open_call = result.get("open_call")
        return Claim(
            outcome=result["outcome"],
            call=call,
            reason=result.get("reason"),
            due_in_seconds=result.get("due_in_seconds"),
            until=_maybe_ts(result.get("until")),
            timezone=result.get("timezone") or "UTC",
            cancel=_cancels(result.get("cancel")),
            retry_after=result.get("retry_after"),
            open_call=StaleCall(
                call_id=open_call["call_id"],
                claimed_at=_ts(open_call["claimed_at"]),
                form_ids=tuple(open_call["form_ids"] or ()),
                placed=open_call["placed"],
                unknown=open_call["unknown"],
            )
            if open_call
            else None,
        )

    def record_placed(self, call_id: str, vapi_call_id: str, *, status: str | None = None) -> bool:
        return self._rpc(
            "record_call_placed",
            {"p_call_id": call_id, "p_vapi_call_id": vapi_call_id, "p_status": status},
        )["recorded"]

    def release(self, call_id: str, error: str, *, refund_attempt: bool = False) -> bool:
        return self._rpc(
            "release_call",
            {"p_call_id": call_id, "p_error": error, "p_refund_attempt": refund_attempt},
        )["released"]

    def record_failed(self, call_id: str, error: str) -> bool:
        return self._rpc("record_call_failed", {"p_call_id": call_id, "p_error": error})["recorded"]

    def record_unknown(self, call_id: str, error: str) -> bool:
        return self._rpc("record_call_unknown", {"p_call_id": call_id, "p_error": error})[
            "recorded"
        ]

    def record_call_event(self, event: CallEvent, *, source: str = "call-events") -> RecordedEvent:
        result = self._rpc(
            "record_call_event",
            {
                "p_vapi_call_id": event.vapi_call_id,
                "p_form_ids": list(event.form_ids),
                "p_status": event.status,
                "p_ended_reason": event.ended_reason,
                "p_outcome": event.outcome,
                "p_started_at": event.started_at.isoformat() if event.started_at else None,
                "p_ended_at": event.ended_at.isoformat() if event.ended_at else None,
                "p_cost": event.cost,
                "p_opt_out": event.opt_out,
                "p_follow_up_on": sorted(self.rules.follow_up_on),
                "p_max_calls_per_form": self.rules.max_calls_per_form,
                "p_follow_up_delay_seconds": self.rules.follow_up_delay_seconds,
                "p_source": source,
            },
        )
        return RecordedEvent(
            status=result["status"],
            call_id=result.get("call_id"),
            reason=result.get("reason"),
            ended=bool(result.get("ended")),
            duplicate=bool(result.get("duplicate")),
            outcome=result.get("outcome"),
            follow_ups=tuple(
                FollowUp(
                    form_id=f["form_id"],
                    next_call_at=_ts(f["next_call_at"]),
                    timezone=f["timezone"],
                )
                for f in result.get("follow_ups") or []
            ),
            opted_out=bool(result.get("opted_out")),
            cancel=_cancels(result.get("cancel")),
        )

    def schedule_state(self, form_id: str) -> ScheduleState | None:
        row = self._rpc("form_schedule_state", {"p_form_id": form_id})
        if not row:
            return None
        return ScheduleState(
            id=row["id"],
            deadline=_maybe_ts(row["deadline"]),
            submitted=row["submitted"],
            call_status=row["call_status"],
            message_id=row["qstash_message_id"],
            scheduled_deadline=_maybe_ts(row["scheduled_deadline"]),
            timezone=row["timezone"],
            due=row["due"],
            next_call_at=_maybe_ts(row.get("next_call_at")),
            due_at=_maybe_ts(row.get("due_at")),
            opted_out=bool(row.get("opted_out")),
        )

    def record_scheduled(
        self, form_id: str, *, message_id: str, deadline: datetime, not_before: datetime
    ) -> bool:
        """The form's message is `message_id`, for the due moment `deadline` (or a follow-up's)."""
        return self._rpc(
            "record_form_scheduled",
            {
                "p_form_id": form_id,
                "p_message_id": message_id,
                "p_deadline": deadline.isoformat(),
                "p_not_before": not_before.isoformat(),
            },
        )["recorded"]

    def record_unscheduled(self, form_id: str, *, message_id: str | None, reason: str) -> bool:
        return self._rpc(
            "record_form_unscheduled",
            {"p_form_id": form_id, "p_message_id": message_id, "p_reason": reason},
        )["recorded"]

    def record_deferred(self, form_id: str, *, until: datetime, message_id: str | None) -> bool:
        return self._rpc(
            "record_call_deferred",
            {"p_form_id": form_id, "p_until": until.isoformat(), "p_message_id": message_id},
        )["recorded"]

    def record_delivery_failed(self, form_id: str, *, reason: str, detail: dict[str, Any]) -> str:
        return self._rpc(
            "record_delivery_failed",
            {"p_form_id": form_id, "p_reason": reason, "p_detail": Jsonb(detail)},
        )["outcome"]

    def overdue_page(self, *, limit: int, after: OverdueForm | None = None) -> list[OverdueForm]:
        """Due forms (deadlines and follow-ups) by due moment; `deadline` is that moment."""
        params: dict[str, Any] = {"p_limit": limit}
        if after is not None:
            params |= {"p_after_deadline": after.deadline.isoformat(), "p_after_id": after.id}
        rows = self._rpc("find_overdue_forms", params)
        return [
            OverdueForm(id=r["id"], deadline=_ts(r["deadline"]), timezone=r["timezone"])
            for r in rows
        ]

    def stale_calls(self, *, lease_seconds: int, limit: int = 100) -> list[StaleCall]:
        rows = self._rpc("find_stale_calls", {"p_lease_seconds": lease_seconds, "p_limit": limit})
        return [
            StaleCall(
                call_id=r["call_id"],
                claimed_at=_ts(r["claimed_at"]),
                form_ids=tuple(r["form_ids"] or ()),
            )
            for r in rows
        ]

    def forms_waiting_for_line(self) -> list[str]:
        """The oldest forms waiting for a line, as many as lines are free (none without ledger)."""
        if self.rules.lines is None:
            return []
        return self._rpc(
            "forms_waiting_for_line",
            {"p_lines": self.rules.lines, "p_max_call_seconds": self.rules.max_call_seconds},
        )

    def calls_awaiting_outcome(self, *, timeout_seconds: int, limit: int = 100) -> list[OpenCall]:
        rows = self._rpc(
            "find_calls_awaiting_outcome", {"p_timeout_seconds": timeout_seconds, "p_limit": limit}
        )
        return [OpenCall(call_id=r["call_id"], vapi_call_id=r["vapi_call_id"]) for r in rows]

    def accept_qstash_token(self, jti: str, *, expires_at: datetime) -> bool:
        """Record a QStash token's first use; False if its jti was already used (a replay)."""
        params = {"p_jti": jti, "p_expires_at": expires_at.isoformat()}
        return self._rpc("accept_qstash_token", params)["accepted"]
