"""The clinic's roles cannot write formcall's state in `forms` (issue 14, finding 3).

The attack: a clinic user allowed by RLS to edit only their own patients' forms set their form's
`qstash_message_id` to another patient's message and submitted the form; schedule-form then
cancelled the victim's message. Here the clinic's requests run as PostgREST runs them
(`set role authenticated`, `request.jwt.claims`) under a realistic policy.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from formcall import clients, settings
from formcall.schedule import sync_form_schedule
from formcall_dev.seed import create_form, create_patient
from tests.support.reads import form_row, qstash_message

GUARDED = [
    "call_status",
    "call_attempts",
    "called_at",
    "vapi_call_id",
    "last_call_error",
    "claimed_at",
    "qstash_message_id",
    "scheduled_deadline",
]


@pytest.fixture
def clinic(conn):
    """The clinic app's own schema: who may see which patient, and RLS policies on it."""
    conn.execute("""
        create schema if not exists auth;
        -- Supabase's auth.uid(), as it reads PostgREST's claims.
        create or replace function auth.uid() returns uuid language sql stable as $$
          select nullif(current_setting('request.jwt.claims', true)::jsonb ->> 'sub', '')::uuid
        $$;
        grant usage on schema auth to authenticated;
        grant execute on function auth.uid() to authenticated;
        create table if not exists public.clinic_patients (
          user_id uuid not null,
          patient_id uuid not null references public.patients on delete cascade,
          primary key (user_id, patient_id));
        grant usage on schema public to authenticated;
        -- Supabase grants table privileges to authenticated by default; RLS decides the rows.
        grant select, insert, update, delete on public.forms, public.patients,
          public.clinic_patients to authenticated;
        drop policy if exists clinic_forms on public.forms;
        create policy clinic_forms on public.forms for all to authenticated
          using (patient_id in (select patient_id from public.clinic_patients
                                 where user_id = auth.uid()))
          with check (patient_id in (select patient_id from public.clinic_patients
                                      where user_id = auth.uid()));
        drop policy if exists clinic_patients on public.patients;
        create policy clinic_patients on public.patients for all to authenticated
          using (id in (select patient_id from public.clinic_patients where user_id = auth.uid()));
        alter table public.clinic_patients enable row level security;
        drop policy if exists own_rows on public.clinic_patients;
        create policy own_rows on public.clinic_patients for select to authenticated
          using (user_id = auth.uid());
    """)
    yield
    conn.execute("""
        drop policy clinic_forms on public.forms;
        drop policy clinic_patients on public.patients;
        drop table public.clinic_patients;
        revoke select, insert, update, delete on public.forms, public.patients from authenticated;
    """)


def as_clinic_user(db: str, user_id: str, sql: str, params: tuple = ()) -> int:
    """Run one statement as PostgREST would for this user; returns the rows it touched."""
    with psycopg.connect(db, autocommit=True) as conn, conn.transaction():
        conn.execute("set local role authenticated")
        conn.execute(
            "select set_config('request.jwt.claims', %s, true)",
            (json.dumps({"sub": user_id, "role": "authenticated"}),),
        )
        return conn.execute(sql, params).rowcount


@pytest.fixture
def two_clinics(clinic, stack_env, conn):
    """A clinic user with their own patient's form, and a victim's form they may not touch."""
    attacker, victim_owner = str(uuid.uuid4()), str(uuid.uuid4())
    deadline = datetime.now(UTC) + timedelta(hours=2)
    own_patient = create_patient(conn, full_name="Own Patient", phone="+15550100011")
    victim_patient = create_patient(conn, full_name="Victim Patient", phone="+15550100012")
    conn.execute(
        "insert into clinic_patients values (%s, %s), (%s, %s)",
        (attacker, own_patient, victim_owner, victim_patient),
    )
    own = create_form(conn, patient_id=own_patient, deadline=deadline)
    victim = create_form(conn, patient_id=victim_patient, deadline=deadline)
    config = settings.load(settings.CheckFormsSettings)
    for form in (own, victim):
        assert (
            sync_form_schedule(
                form,
                store=clients.store(config),
                publisher=clients.publisher(config),
                call_form_url=stack_env["CALL_FORM_URL"],
                window=clients.window(config),
            ).action
            == "scheduled"
        )
    return attacker, own, victim


def test_a_clinic_user_cannot_point_their_form_at_another_patients_message(
    two_clinics, db, conn, stack_env
):
    attacker, own, victim = two_clinics
    victim_message = form_row(conn, victim)["qstash_message_id"]
    own_message = form_row(conn, own)["qstash_message_id"]

    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="qstash_message_id"):
        as_clinic_user(
            db,
            attacker,
            "update forms set qstash_message_id = %s where id = %s",
            (victim_message, own),
        )
    # Submitting their own form is what the clinic is for, and works; the webhook then syncs.
    assert (
        as_clinic_user(db, attacker, "update forms set submitted_at = now() where id = %s", (own,))
        == 1
    )
    config = settings.load(settings.CheckFormsSettings)
    result = sync_form_schedule(
        own,
        store=clients.store(config),
        publisher=clients.publisher(config),
        call_form_url=stack_env["CALL_FORM_URL"],
        window=clients.window(config),
    )

    assert (result.action, result.message_id) == ("cancelled", own_message)
    assert qstash_message(stack_env["QSTASH_URL"], stack_env["QSTASH_TOKEN"], own_message) is None
    # The victim's message is untouched and their form still points at it.
    assert (
        qstash_message(stack_env["QSTASH_URL"], stack_env["QSTASH_TOKEN"], victim_message)
        is not None
    )
    assert form_row(conn, victim)["qstash_message_id"] == victim_message


def test_rls_keeps_a_clinic_user_to_their_own_forms(two_clinics, db, conn):
    attacker, _, victim = two_clinics
    assert (
        as_clinic_user(
            db, attacker, "update forms set submitted_at = now() where id = %s", (victim,)
        )
        == 0
    )
    assert form_row(conn, victim)["submitted_at"] is None


@pytest.mark.parametrize(
    "column, value",
    [
        ("call_status", "'called'"),
        ("call_status", "'failed'"),
        ("call_attempts", "99"),
        ("called_at", "now()"),
        ("vapi_call_id", "'call_forged'"),
        ("last_call_error", "'x'"),
        ("claimed_at", "now()"),
        ("qstash_message_id", "null"),
        ("scheduled_deadline", "null"),
    ],
)
def test_every_formcall_column_is_refused_to_the_clinic(two_clinics, db, conn, column, value):
    attacker, own, _ = two_clinics
    before = form_row(conn, own)
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match=column):
        as_clinic_user(db, attacker, f"update forms set {column} = {value} where id = %s", (own,))
    assert form_row(conn, own) == before


def test_the_clinic_may_still_edit_its_own_columns(two_clinics, db, conn):
    attacker, own, _ = two_clinics
    new_deadline = datetime.now(UTC) + timedelta(days=1)
    assert (
        as_clinic_user(
            db,
            attacker,
            "update forms set title = 'Renamed', deadline = %s where id = %s",
            (new_deadline, own),
        )
        == 1
    )
    row = form_row(conn, own)
    assert row["title"] == "Renamed" and row["deadline"] == new_deadline


def test_a_clinic_user_may_insert_a_fresh_form_but_not_one_with_call_state(two_clinics, db, conn):
    attacker, own, _ = two_clinics
    patient = form_row(conn, own)["patient_id"]
    assert (
        as_clinic_user(
            db,
            attacker,
            "insert into forms (patient_id, title, deadline) values (%s, 'New', now())",
            (patient,),
        )
        == 1
    )
    for column, value in (
        ("call_status", "'called'"),
        ("qstash_message_id", "'msg_x'"),
        ("call_attempts", "5"),
    ):
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match=column):
            as_clinic_user(
                db,
                attacker,
                f"insert into forms (patient_id, title, {column}) values (%s, 'Forged', {value})",
                (patient,),
            )


def test_formcall_roles_still_write_the_state(two_clinics, db, conn):
    # service_role (the REST path) and the owner/superuser (the direct DATABASE_URL path).
    _, own, _ = two_clinics
    with psycopg.connect(db, autocommit=True) as service, service.transaction():
        service.execute("set local role service_role")
        assert (
            service.execute(
                "update forms set last_call_error = 'by service_role' where id = %s", (own,)
            ).rowcount
            == 1
        )
    conn.execute("update forms set call_attempts = 2 where id = %s", (own,))
    row = form_row(conn, own)
    assert (row["last_call_error"], row["call_attempts"]) == ("by service_role", 2)


def test_anon_cannot_write_formcall_state_even_with_table_privileges(two_clinics, db, conn):
    # A misconfigured grant (and no RLS policy for anon) must still not reach these columns.
    _, own, _ = two_clinics
    conn.execute("grant usage on schema public to anon")
    conn.execute("grant select, update on public.forms to anon")
    conn.execute("create policy anon_all on public.forms for all to anon using (true)")
    try:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="call_status"):
            with psycopg.connect(db, autocommit=True) as anon, anon.transaction():
                anon.execute("set local role anon")
                anon.execute("update forms set call_status = 'failed' where id = %s", (own,))
    finally:
        conn.execute("drop policy anon_all on public.forms")
        conn.execute("revoke select, update on public.forms from anon")
    assert form_row(conn, own)["call_status"] == "pending"


@pytest.mark.parametrize(
    "column, value",
    [("call_outcome", "'reached'"), ("next_call_at", "now()"), ("line_wait_at", "now()")],
)
def test_the_call_outcome_columns_are_guarded_too(two_clinics, db, conn, column, value):
    # Issue 10's and 11's columns: a clinic user can neither fake an outcome nor move a call.
    attacker, own, _ = two_clinics
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match=column):
        as_clinic_user(db, attacker, f"update forms set {column} = {value} where id = %s", (own,))
