"""Insert patients and forms (the dev demo, chaos, benchmarks, tests)."""

from __future__ import annotations

from datetime import datetime


def create_patient(
    conn, *, full_name: str = "Test Patient", phone: str = "+15550100000", timezone: str = "UTC"
) -> str:
    row = conn.execute(
        "insert into patients (full_name, phone, timezone) values (%s, %s, %s) returning id",
        (full_name, phone, timezone),
    ).fetchone()
    return str(row[0])


def create_form(
    conn,
    *,
    patient_id: str,
    title: str = "Intake form",
    deadline: datetime | None = None,
    submitted_at: datetime | None = None,
    form_id: str | None = None,
    silent: bool = False,
) -> str:
    """Insert a form; `silent` skips triggers, as if its webhook (and one-time job) were lost."""
    if silent:
        with conn.transaction():
            conn.execute("set local session_replication_role = replica")
            return create_form(
                conn,
                patient_id=patient_id,
                title=title,
                deadline=deadline,
                submitted_at=submitted_at,
                form_id=form_id,
            )
    row = conn.execute(
        "insert into forms (id, patient_id, title, deadline, submitted_at)"
        " values (coalesce(%s::uuid, gen_random_uuid()), %s, %s, %s, %s) returning id",
        (form_id, patient_id, title, deadline, submitted_at),
    ).fetchone()
    return str(row[0])


def create_forms_one_patient_each(conn, *, count: int, title: str, deadline: datetime) -> list[str]:
    """`count` forms, each of its own patient (formcall calls a patient once for all due forms)."""
    rows = conn.execute(
        "with p as (insert into patients (full_name, phone)"
        "           select 'Patient ' || g, '+1555' || lpad(g::text, 7, '0')"
        "             from generate_series(1, %s) g returning id)"
        " insert into forms (patient_id, title, deadline) select id, %s, %s from p returning id",
        (count, title, deadline),
    ).fetchall()
    return [str(r[0]) for r in rows]
