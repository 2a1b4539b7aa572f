"""`formcall status` against a deployed stack's APIs: Supabase's REST API (the stand-in, PostgREST's
wire shape, checked with the official client) and QStash's public API (the local QStash), real
HTTP; the same report as over a direct database connection."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from qstash import QStash
from typer.testing import CliRunner

from formcall_cli.main import app as cli
from formcall_dev.seed import create_form, create_patient
from formcall_dev.servers import serve_in_thread
from formcall_dev.supabase import rest


@pytest.fixture(scope="module")
def rest_api(pg_dsn, keys):
    handle = serve_in_thread(rest.create_app(dsn=pg_dsn, service_role_key=keys.service_role_key))
    yield handle.url
    handle.stop()


@pytest.fixture
def stack(conn, keys, local_qstash):
    """Two forms: one with a queued QStash message, one failed after a call, with its history."""
    queued = create_form(
        conn,
        patient_id=create_patient(conn, phone="+15550130001"),
        deadline=datetime.now(UTC) + timedelta(hours=1),
    )
    due = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
    message = QStash(keys.qstash_token, base_url=local_qstash).message.publish_json(
        url="http://127.0.0.1:9/api/jobs/call-form",
        body={"formId": queued},
        not_before=int(due.timestamp()),
    )
    conn.execute(
        "update forms set qstash_message_id = %s where id = %s", (message.message_id, queued)
    )
    patient = create_patient(conn, phone="+15550130002")
    failed = create_form(conn, patient_id=patient, deadline=datetime.now(UTC) - timedelta(hours=1))
    conn.execute(
        "update forms set call_status = 'failed', call_attempts = 2, vapi_call_id = 'call-1',"
        " last_call_error = 'HTTP 422', qstash_message_id = 'msg_delivered' where id = %s",
        (failed,),
    )
    (call,) = conn.execute(
        "insert into calls (patient_id, vapi_call_id, status, outcome, ended_reason, cost,"
        " started_at, ended_at) values (%s, 'call-1', 'ended', 'bad_number',"
        " 'call.start.error-vapi-number-invalid', 0.0123, now() - interval '50 minutes',"
        " now() - interval '49 minutes') returning id",
        (patient,),
    ).fetchone()
    conn.execute("insert into call_forms (call_id, form_id) values (%s, %s)", (call, failed))
    for event, detail in (("claimed", {"attempt": 1}), ("failed", {"reason": "HTTP 422"})):
        conn.execute(
            "insert into form_call_events (form_id, event, detail) values (%s, %s, %s)",
            (failed, event, json.dumps(detail)),
        )
    return {"queued": queued, "failed": failed, "due": due}


def run_status(monkeypatch, tmp_path, settings: dict[str, str], *args: str):
    for name in ("DATABASE_URL", "SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY", "QSTASH_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    # No local stack in this folder: every setting comes from the environment.
    return CliRunner().invoke(
        cli, ["status", *args, "--data-dir", str(tmp_path)], env={"COLUMNS": "250"}
    )


def test_status_reads_supabase_rest_and_qstash_api_as_a_direct_connection_does(
    monkeypatch, tmp_path, env, stack, rest_api, local_qstash, keys, db
):
    qstash = {"QSTASH_URL": local_qstash, "QSTASH_TOKEN": keys.qstash_token}
    deployed = {"SUPABASE_URL": rest_api, "SUPABASE_SERVICE_ROLE_KEY": keys.service_role_key}

    every = run_status(monkeypatch, tmp_path, {**deployed, **qstash})
    one = run_status(monkeypatch, tmp_path, {**deployed, **qstash}, stack["failed"])

    assert every.exit_code == 0, every.output
    assert "failed: 1, pending: 1" in every.output
    assert stack["queued"] in every.output and stack["failed"] in every.output
    assert f"queued, due {stack['due']:%Y-%m-%d %H:%M:%S}" in every.output
    assert "not queued (delivered or cancelled)" in every.output
    assert one.exit_code == 0, one.output
    for text in (
        "status: failed",
        "call-1",
        "bad_number",
        "call.start.error-vapi-number-invalid",
        "$0.0123",
        "reason: HTTP 422",
        "QStash message: msg_delivered: not queued",
        "patient opted out: no",
    ):
        assert text in one.output, text
    # The same report over a direct connection (DATABASE_URL): same rows, same types.
    assert run_status(monkeypatch, tmp_path, {"DATABASE_URL": db, **qstash}).output == every.output
    direct = run_status(monkeypatch, tmp_path, {"DATABASE_URL": db, **qstash}, stack["failed"])
    assert direct.output == one.output


def test_status_over_rest_refuses_a_wrong_key_and_names_an_unknown_form(
    monkeypatch, tmp_path, env, stack, rest_api, local_qstash, keys
):
    qstash = {"QSTASH_URL": local_qstash, "QSTASH_TOKEN": keys.qstash_token}

    wrong = run_status(
        monkeypatch,
        tmp_path,
        {"SUPABASE_URL": rest_api, "SUPABASE_SERVICE_ROLE_KEY": "not-the-key", **qstash},
    )
    unknown = str(uuid.uuid4())
    missing = run_status(
        monkeypatch,
        tmp_path,
        {"SUPABASE_URL": rest_api, "SUPABASE_SERVICE_ROLE_KEY": keys.service_role_key, **qstash},
        unknown,
    )
    nothing = run_status(monkeypatch, tmp_path, qstash)

    assert wrong.exit_code == 2
    assert wrong.output.strip() == "error: Supabase refused the key (SUPABASE_SERVICE_ROLE_KEY)"
    assert missing.exit_code == 2 and missing.output.strip() == f"error: no form {unknown}"
    assert nothing.exit_code == 2 and "SUPABASE_SERVICE_ROLE_KEY" in nothing.output


def test_the_rest_stand_in_answers_postgrest_table_reads(db, conn, rest_api, keys):
    from supabase import ClientOptions, create_client

    patient = create_patient(conn, phone="+15550130003")
    forms = [create_form(conn, patient_id=patient, title=f"Form {n}") for n in range(3)]
    client = create_client(
        rest_api,
        keys.service_role_key,
        options=ClientOptions(httpx_client=httpx.Client(timeout=10)),
    )

    # The official client (postgrest-py) builds the requests and reads the answers.
    counted = (
        client.table("forms")
        .select("id,title", count="exact")
        .eq("patient_id", patient)
        .order("title", desc=True)
        .limit(2)
        .execute()
    )
    chosen = client.table("forms").select("id").in_("id", forms[:2]).execute()
    nulls = client.table("forms").select("id").is_("submitted_at", "null").execute()

    assert counted.count == 3
    assert [row["title"] for row in counted.data] == ["Form 2", "Form 1"]
    assert sorted(row["id"] for row in chosen.data) == sorted(forms[:2])
    assert len(nulls.data) == 3

    def get(path: str, key: str = keys.service_role_key, **params: str) -> httpx.Response:
        return httpx.get(f"{rest_api}/rest/v1/{path}", params=params, headers={"apikey": key})

    empty = httpx.get(
        f"{rest_api}/rest/v1/forms",
        params={"select": "id", "call_status": "eq.failed", "limit": "1"},
        headers={"apikey": keys.service_role_key, "Prefer": "count=exact"},
    )
    assert empty.json() == [] and empty.headers["content-range"] == "*/0"
    assert get("forms", "wrong").status_code == 401
    assert get("nowhere").json()["code"] == "PGRST205"
    assert get("forms", select="nope").json()["code"] == "42703"
    assert get("forms", id="eq.not-a-uuid").json()["code"] == "22P02"
    assert get("forms", select="id,patients(phone)").status_code == 400  # no embedding
