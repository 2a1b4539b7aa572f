"""What the console reads from the stack's database: forms, their audit trail and their calls."""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import AsyncConnection
from psycopg.rows import dict_row

BASE_STATUSES = ("pending", "calling", "called", "failed")
# The outcome classes of the call-outcomes schema (issue 10).
OUTCOMES = ("reached", "voicemail", "no_answer", "busy", "not_connected", "bad_number")
FORMS_LIMIT = 200


@dataclass(frozen=True)
class Features:
    """Which parts of the call-outcome schema this database has (it may predate them)."""

    call_outcome: bool = False
    next_call_at: bool = False
    opted_out_at: bool = False
    calls: bool = False

    @property
    def statuses(self) -> tuple[str, ...]:
        return BASE_STATUSES + (("opted_out",) if self.opted_out_at else ())


async def features(conn: AsyncConnection) -> Features:
    rows = await (
        await conn.execute(
            "select table_name, column_name from information_schema.columns"
            " where table_schema = 'public'"
            " and table_name in ('forms', 'patients', 'calls', 'call_forms')"
        )
    ).fetchall()
    columns = {f"{table}.{column}" for table, column in rows}
    tables = {table for table, _ in rows}
    return Features(
        call_outcome="forms.call_outcome" in columns,
        next_call_at="forms.next_call_at" in columns,
        opted_out_at="patients.opted_out_at" in columns,
        calls={"calls", "call_forms"} <= tables,
    )


def _optional_columns(have: Features) -> str:
    """The select list's optional part: a column when the schema has it, else a typed null."""
    calls_made = (
        "(select count(*) from public.call_forms cf where cf.form_id = f.id)"
        if have.calls
        else "(select count(*) from public.form_call_events e where e.form_id = f.id"
        " and e.event in ('called', 'extra_call'))"
    )
    next_call = "f.next_call_at" if have.next_call_at else "null::timestamptz"
    return ", ".join(
        [
            ("f.call_outcome" if have.call_outcome else "null::text") + " as call_outcome",
            # A pending form is called next at its follow-up time, else at its deadline.
            f"case when f.call_status = 'pending' and f.submitted_at is null"
            f" then coalesce({next_call}, f.deadline) end as next_call_at",
            ("p.opted_out_at" if have.opted_out_at else "null::timestamptz") + " as opted_out_at",
            f"{calls_made} as calls_made",
        ]
    )


_FORM_COLUMNS = """f.id::text as id, f.title, f.deadline, f.submitted_at, f.call_status,
  f.call_attempts, f.called_at, f.vapi_call_id, f.last_call_error, f.qstash_message_id,
  f.scheduled_deadline, f.created_at, f.updated_at, p.id::text as patient_id, p.full_name,
  p.phone, p.timezone"""


async def list_forms(
    conn: AsyncConnection,
    have: Features,
    *,
    status: str | None = None,
    outcome: str | None = None,
    limit: int = FORMS_LIMIT,
) -> list[dict]:
    """The newest forms first, optionally only those with a call status and an outcome."""
    where, params = [], []
    if status:
        where.append("f.call_status = %s")
        params.append(status)
    if outcome and have.call_outcome:
        where.append("f.call_outcome = %s")
        params.append(outcome)
    sql = (
        f"select {_FORM_COLUMNS}, {_optional_columns(have)}"
        " from public.forms f join public.patients p on p.id = f.patient_id"
        + (" where " + " and ".join(where) if where else "")
        + " order by f.created_at desc, f.id limit %s"
    )
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(sql, [*params, limit])
        return await cur.fetchall()


async def count_forms(conn: AsyncConnection) -> dict[str, int]:
    rows = await (
        await conn.execute("select call_status, count(*) from public.forms group by 1 order by 1")
    ).fetchall()
    return {status: count for status, count in rows}


async def get_form(conn: AsyncConnection, have: Features, form_id: str) -> dict | None:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"select {_FORM_COLUMNS}, {_optional_columns(have)}"
            " from public.forms f join public.patients p on p.id = f.patient_id"
            " where f.id = %s",
            (form_id,),
        )
        return await cur.fetchone()


async def form_events(conn: AsyncConnection, form_id: str) -> list[dict]:
    """The form's audit trail (form_call_events), oldest first."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "select id, event, detail, created_at from public.form_call_events"
            " where form_id = %s order by id",
            (form_id,),
        )
        return await cur.fetchall()


async def form_calls(conn: AsyncConnection, have: Features, form_id: str) -> list[dict]:
    """The Vapi calls recorded for the form (the calls table), oldest first; [] before it exists."""
    if not have.calls:
        return []
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "select c.* from public.calls c join public.call_forms cf on cf.call_id = c.id"
            " where cf.form_id = %s order by c.created_at",
            (form_id,),
        )
        return await cur.fetchall()


async def pending_forms(conn: AsyncConnection, limit: int = 50) -> list[dict]:
    """Unsubmitted forms a developer may submit or move (the Act page's choices)."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "select f.id::text as id, f.title, f.deadline, f.call_status, p.full_name"
            " from public.forms f join public.patients p on p.id = f.patient_id"
            " where f.submitted_at is null order by f.created_at desc limit %s",
            (limit,),
        )
        return await cur.fetchall()
