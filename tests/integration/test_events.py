"""Every sample event in events/ goes through its handler, re-signed by `formcall sign-event`."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from formcall_cli.main import app as cli
from formcall_dev.polling import wait_until
from formcall_dev.seed import create_form, create_patient
from tests.support.lambda_handlers import invoke
from tests.support.reads import form_row

EVENTS = sorted((Path(__file__).resolve().parents[2] / "events").glob("*.json"))
FORM_ID = "0b0e5f2c-5d43-4a59-9a33-3c1a6a1d2f10"


def function_for(path: Path) -> str:
    return next(
        f for f in ("call_form", "check_forms", "setup", "call_events") if path.name.startswith(f)
    )


def test_every_event_file_is_covered():
    assert {function_for(p) for p in EVENTS} == {"call_form", "check_forms", "setup", "call_events"}
    assert len(EVENTS) >= 8


@pytest.fixture
def signed_events(tmp_path, keys):
    copies = [Path(shutil.copy(p, tmp_path / p.name)) for p in EVENTS]
    result = CliRunner().invoke(cli, ["sign-event", *map(str, copies), "--key", keys.current_key])
    assert result.exit_code == 0, result.output
    assert "4 of 8 files carry a QStash signature" in result.output.replace("\n", " ")
    return {
        p.name: json.loads(
            p.read_text()
            .replace("REPLACE_WITH_CRON_SECRET", keys.cron_secret)
            .replace("REPLACE_WITH_VAPI_WEBHOOK_SECRET", keys.vapi_webhook_secret)
        )
        for p in copies
    }


@pytest.mark.parametrize("name", [p.name for p in EVENTS])
def test_event_runs_through_its_handler(name, signed_events, stack_env, vapi, conn):
    patient = create_patient(conn)
    create_form(
        conn,
        patient_id=patient,
        form_id=FORM_ID,
        deadline=datetime.now(UTC) - timedelta(minutes=2),
    )
    if name.startswith("call_events"):
        # The call was claimed; Vapi's message, naming the form, is the first word of it.
        conn.execute("select claim_form_call(%s)", (FORM_ID,))
    answer = invoke(function_for(Path(name)), signed_events[name])
    assert answer.status == 200, answer.body
    if name.startswith("call_events"):
        assert answer.body["status"] == "recorded"
        row = form_row(conn, FORM_ID)
        assert row["vapi_call_id"] == "5f3c1a0e-8d2b-4c6f-9e7a-1b2c3d4e5f60"
        if "end_of_call" in name:
            assert (row["call_status"], row["call_outcome"]) == ("pending", "no_answer")
        else:
            assert (row["call_status"], row["call_outcome"]) == ("called", None)
    elif name.startswith("call_form"):
        # Called by this event; a late delivery left over from an earlier event's test (same
        # form id) may win the claim first, and then this one is skipped: one call either way.
        assert (answer.body["status"], answer.body.get("reason")) in (
            ("called", None),
            ("skipped", "already_called"),
            ("skipped", "in_progress"),
        ), answer.body
        wait_until(lambda: form_row(conn, FORM_ID)["call_status"] == "called")
        assert len(vapi.calls_for_form(FORM_ID)) == 1
    elif name.startswith("check_forms"):
        assert answer.body["found"] == 1 and answer.body["enqueued"] == 1
    else:
        assert answer.body["schedule"]["scheduleId"] == "formcall-check-forms"


def test_unsigned_copies_of_the_signed_events_are_refused(stack_env, vapi):
    # The committed signatures use a placeholder key, never a real one; likewise the secrets.
    for path in EVENTS:
        event = json.loads(path.read_text())
        if "upstash-signature" in event["headers"] or "x-vapi-secret" in event["headers"]:
            assert invoke(function_for(path), event).status == 401


def test_sign_event_errors_are_clear(tmp_path):
    result = CliRunner().invoke(cli, ["sign-event", str(tmp_path / "missing.json"), "--key", "k"])
    assert result.exit_code == 2 and "no such file" in result.output
    assert "Traceback" not in result.output
