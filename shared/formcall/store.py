"""The form store: the SQL functions of supabase/migrations, over Supabase RPC or direct Postgres.

Both paths call the very same SQL functions with the same named arguments; only the
transport differs. Atomicity lives in those functions, not here.
"""

from __future__ import annotations

import threading
from datetime import datetime
from typing import Any, Protocol

from formcall.errors import DatabaseUnavailable
from formcall.models import Claim, FormForCall, OverdueForm, ScheduleState, StaleCall


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
            conn = psycopg.connect(self._dsn, autocommit=True, connect_timeout=self._connect_timeout,
                                   prepare_threshold=None)
            self._local.conn = conn
        return conn

    def __call__(self, function: str, params: dict[str, Any]) -> Any:
        import psycopg
        from psycopg import sql

        query = sql.SQL("select {}({})").format(
            sql.Identifier("public", function),
            sql.SQL(", ").join(sql.SQL("{} => {}").format(sql.Identifier(name), sql.Placeholder(name))
                               for name in params),
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
                raise DatabaseUnavailable("database unavailable",
                                          cause=type(exc).__name__) from exc
            # A kept connection the server closed while it sat idle (a restart, an idle timeout,
            # a pooler recycling it): once more on a new one. Every SQL function is safe to run
            # twice; a claim that did commit answers "in_progress" and the sweep reconciles it.
            try:
                row = self._connection().execute(query, params).fetchone()
            except psycopg.OperationalError as again:
                self._drop_connection()
                raise DatabaseUnavailable("database unavailable",
                                          cause=type(again).__name__) from again
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
        self._client = None
        self._lock = threading.Lock()

    def _supabase(self):
        with self._lock:
            if self._client is None:
                import httpx
                from supabase import ClientOptions, create_client  # ~0.5 s import: this path only

                # Bounded timeouts: a hung request must end well inside the Lambda timeout.
                http = httpx.Client(timeout=httpx.Timeout(10.0, connect=5.0))
                self._client = create_client(self._url, self._key,
                                             options=ClientOptions(httpx_client=http))
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


class FormStore:
    """The call state machine, one method per SQL function."""

    def __init__(self, rpc: Rpc, *, max_attempts: int = 5) -> None:
        self._rpc = rpc
        self._max_attempts = max_attempts

    def claim(self, form_id: str, *, delivery: dict[str, Any] | None = None) -> Claim:
        params: dict[str, Any] = {"p_form_id": form_id, "p_max_attempts": self._max_attempts}
        if delivery is not None:
            params["p_delivery"] = Jsonb(delivery)
        result = self._rpc("claim_form_call", params)
        form = result.get("form")
        return Claim(
            outcome=result["outcome"],
            reason=result.get("reason"),
            due_in_seconds=result.get("due_in_seconds"),
            form=FormForCall(
                id=form["id"], title=form["title"], deadline=_ts(form["deadline"]),
                patient_name=form["patient_name"], phone=form["phone"],
                timezone=form["timezone"], call_attempts=form["call_attempts"],
                claimed_at=_ts(form["claimed_at"]),
            ) if form else None,
        )

    def record_placed(self, form_id: str, call_id: str) -> bool:
        return self._rpc("record_call_placed", {"p_form_id": form_id, "p_call_id": call_id})["recorded"]

    def release(self, form_id: str, error: str, *, refund_attempt: bool = False) -> bool:
        return self._rpc("release_form_call", {"p_form_id": form_id, "p_error": error,
                                               "p_refund_attempt": refund_attempt})["released"]

    def record_failed(self, form_id: str, error: str) -> bool:
        return self._rpc("record_call_failed", {"p_form_id": form_id, "p_error": error})["recorded"]

    def record_unknown(self, form_id: str, error: str) -> bool:
        return self._rpc("record_call_unknown", {"p_form_id": form_id, "p_error": error})["recorded"]

    def schedule_state(self, form_id: str) -> ScheduleState | None:
        row = self._rpc("form_schedule_state", {"p_form_id": form_id})
        if not row:
            return None
        return ScheduleState(
            id=row["id"], deadline=_ts(row["deadline"]) if row["deadline"] else None,
            submitted=row["submitted"], call_status=row["call_status"],
            message_id=row["qstash_message_id"],
            scheduled_deadline=_ts(row["scheduled_deadline"]) if row["scheduled_deadline"] else None,
            timezone=row["timezone"], due=row["due"])

    def record_scheduled(self, form_id: str, *, message_id: str, deadline: datetime,
                         not_before: datetime) -> bool:
        return self._rpc("record_form_scheduled", {
            "p_form_id": form_id, "p_message_id": message_id, "p_deadline": deadline.isoformat(),
            "p_not_before": not_before.isoformat()})["recorded"]

    def record_unscheduled(self, form_id: str, *, message_id: str | None, reason: str) -> bool:
        return self._rpc("record_form_unscheduled", {"p_form_id": form_id,
                                                     "p_message_id": message_id,
                                                     "p_reason": reason})["recorded"]

    def record_deferred(self, form_id: str, *, until: datetime, message_id: str | None) -> bool:
        return self._rpc("record_call_deferred", {"p_form_id": form_id,
                                                  "p_until": until.isoformat(),
                                                  "p_message_id": message_id})["recorded"]

    def record_delivery_failed(self, form_id: str, *, reason: str, detail: dict[str, Any]) -> str:
        return self._rpc("record_delivery_failed", {"p_form_id": form_id, "p_reason": reason,
                                                    "p_detail": Jsonb(detail)})["outcome"]

    def overdue_page(self, *, limit: int, after: OverdueForm | None = None) -> list[OverdueForm]:
        params: dict[str, Any] = {"p_limit": limit}
        if after is not None:
            params |= {"p_after_deadline": after.deadline.isoformat(), "p_after_id": after.id}
        rows = self._rpc("find_overdue_forms", params)
        return [OverdueForm(id=r["id"], deadline=_ts(r["deadline"]), timezone=r["timezone"])
                for r in rows]

    def stale_calls(self, *, lease_seconds: int, limit: int = 100) -> list[StaleCall]:
        rows = self._rpc("find_stale_calls", {"p_lease_seconds": lease_seconds, "p_limit": limit})
        return [StaleCall(id=r["id"], claimed_at=_ts(r["claimed_at"]),
                          call_attempts=r["call_attempts"]) for r in rows]

    def accept_qstash_token(self, jti: str, *, expires_at: datetime) -> bool:
        """Record a QStash token's first use; False if its jti was already used (a replay)."""
        params = {"p_jti": jti, "p_expires_at": expires_at.isoformat()}
        return self._rpc("accept_qstash_token", params)["accepted"]
