"""The form store: the SQL functions of supabase/migrations, over Supabase RPC or direct Postgres.

Both paths call the very same SQL functions with the same named arguments; only the
transport differs. Atomicity lives in those functions, not here.
"""

from __future__ import annotations

import threading
from datetime import datetime
from typing import Any, Protocol

from formcall.errors import DatabaseUnavailable
from formcall.models import Claim, FormForCall, OverdueForm, StaleCall


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
        try:
            row = self._connection().execute(query, params).fetchone()
        except psycopg.OperationalError as exc:
            self._drop_connection()
            raise DatabaseUnavailable("database unavailable", cause=type(exc).__name__) from exc
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

    def claim(self, form_id: str) -> Claim:
        result = self._rpc("claim_form_call", {"p_form_id": form_id,
                                               "p_max_attempts": self._max_attempts})
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

    def release(self, form_id: str, error: str) -> bool:
        return self._rpc("release_form_call", {"p_form_id": form_id, "p_error": error})["released"]

    def record_failed(self, form_id: str, error: str) -> bool:
        return self._rpc("record_call_failed", {"p_form_id": form_id, "p_error": error})["recorded"]

    def record_unknown(self, form_id: str, error: str) -> bool:
        return self._rpc("record_call_unknown", {"p_form_id": form_id, "p_error": error})["recorded"]

    def overdue_page(self, *, limit: int, after: OverdueForm | None = None) -> list[OverdueForm]:
        params: dict[str, Any] = {"p_limit": limit}
        if after is not None:
            params |= {"p_after_deadline": after.deadline.isoformat(), "p_after_id": after.id}
        rows = self._rpc("find_overdue_forms", params)
        return [OverdueForm(id=r["id"], deadline=_ts(r["deadline"])) for r in rows]

    def stale_calls(self, *, lease_seconds: int, limit: int = 100) -> list[StaleCall]:
        rows = self._rpc("find_stale_calls", {"p_lease_seconds": lease_seconds, "p_limit": limit})
        return [StaleCall(id=r["id"], claimed_at=_ts(r["claimed_at"]),
                          call_attempts=r["call_attempts"]) for r in rows]
