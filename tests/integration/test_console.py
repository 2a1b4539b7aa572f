"""The console's routes over real HTTP, no browser: real Postgres, local QStash, fake Vapi."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from qstash import QStash

from formcall_dev.console import ConsoleConfig, create_app
from formcall_dev.polling import wait_until
from formcall_dev.seed import create_form, create_patient
from formcall_dev.servers import free_port, serve_in_thread
from tests.support.reads import form_events, form_row


@pytest.fixture(scope="module")
def console(pg_dsn, keys, local_qstash, function_server, vapi_server):
    """The console on loopback, pointed at this session's database and servers."""
    config = ConsoleConfig(
        dsn=pg_dsn,
        qstash_url=local_qstash,
        qstash_token=keys.qstash_token,
        check_forms_url=f"{function_server}/api/cron/check-forms",
        cron_secret=keys.cron_secret,
        vapi_url=vapi_server[1],
        vapi_key=keys.vapi_key,
    )
    handle = serve_in_thread(create_app(config))
    yield handle.url
    handle.stop()


@pytest.fixture
def web(console, stack_env, vapi):
    with httpx.Client(base_url=console, timeout=30) as client:
        yield client


@pytest.fixture
def qstash(local_qstash, keys):
    client = QStash(keys.qstash_token, base_url=local_qstash, retry=False)
    yield client
    for schedule in client.schedule.list():
        client.schedule.delete(schedule.schedule_id)
    client.dlq.delete_many([m.dlq_id for m in client.dlq.list().messages])


def text(answer: httpx.Response) -> str:
    """The page's text without tags or runs of white space."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", answer.text))


def overdue_form(
    conn,
    *,
    phone: str = "+15550100201",
    name: str = "Grace Hopper",
    zone: str = "America/New_York",
    title: str = "Consent form",
) -> str:
    patient = create_patient(conn, full_name=name, phone=phone, timezone=zone)
    return create_form(
        conn, patient_id=patient, title=title, deadline=datetime.now(UTC) - timedelta(minutes=1)
    )


def counts(conn) -> tuple[int, int]:
    return conn.execute(
        "select (select count(*) from patients), (select count(*) from forms)"
    ).fetchone()


def sweep(web: httpx.Client) -> httpx.Response:
    return web.post("/act/sweep", data={"next": "/act"})


def test_root_redirects_to_forms(web):
    answer = web.get("/")
    assert (answer.status_code, answer.headers["location"]) == (303, "/forms")


def test_forms_page_lists_each_form_with_patient_zone_deadline_and_status(web, conn):
    form = overdue_form(conn)
    page = web.get("/forms")
    assert page.status_code == 200
    assert f'data-form-id="{form}"' in page.text
    assert "Consent form" in page.text and "Grace Hopper" in page.text
    assert "America/New_York" in page.text and "pending" in page.text
    # The live region refreshes itself from the rows fragment, which is not a whole page.
    assert 'data-refresh="/forms/rows"' in page.text
    rows = web.get("/forms/rows")
    assert rows.status_code == 200 and "<html" not in rows.text
    assert f'data-form-id="{form}"' in rows.text


def test_forms_filters_by_status(web, conn):
    pending = overdue_form(conn)
    called = overdue_form(conn, phone="+15550100202", title="Called one")
    conn.execute(
        "update forms set call_status = 'called', vapi_call_id = 'v1' where id = %s", (called,)
    )
    only_called = web.get("/forms/rows", params={"status": "called"}).text
    assert f'data-form-id="{called}"' in only_called
    assert f'data-form-id="{pending}"' not in only_called
    page = web.get("/forms", params={"status": "called"})
    assert 'data-refresh="/forms/rows?status=called"' in page.text


def test_forms_refuses_unknown_filters(web, conn):
    overdue_form(conn)
    for params in ({"status": "lost"}, {"outcome": "maybe"}, {"status": "<script>"}):
        answer = web.get("/forms", params=params)
        assert answer.status_code == 400
        assert "<script>" not in answer.text  # echoed escaped, never as markup


def test_outcome_filter_when_the_schema_has_outcomes(web, conn):
    has_outcome = conn.execute(
        "select 1 from information_schema.columns where table_name = 'forms'"
        " and column_name = 'call_outcome'"
    ).fetchone()
    form = overdue_form(conn)
    page = web.get("/forms").text
    if not has_outcome:
        # Until the call-outcome schema lands the filter is shown but disabled.
        assert re.search(r'id="filter-outcome"[^>]*disabled', page)
        return
    conn.execute(
        "update forms set call_status = 'called', vapi_call_id = 'v2',"
        " call_outcome = 'voicemail' where id = %s",
        (form,),
    )
    assert f'data-form-id="{form}"' in web.get("/forms/rows", params={"outcome": "voicemail"}).text
    assert (
        f'data-form-id="{form}"' not in web.get("/forms/rows", params={"outcome": "reached"}).text
    )


def test_sweep_from_the_console_and_the_journey_of_the_call(web, conn):
    form = overdue_form(conn)
    answer = sweep(web)
    assert answer.status_code == 303
    assert answer.headers["location"].startswith("/act?notice=sweep%20ran")
    wait_until(lambda: form_row(conn, form)["call_status"] == "called")
    call_id = form_row(conn, form)["vapi_call_id"]

    def timeline() -> list[tuple[str, str]]:
        return re.findall(
            r'<tr class="tone-\w+" data-source="(\w+)" data-what="([^"]+)"',
            web.get(f"/forms/{form}").text,
        )

    def qstash_states() -> list[str]:
        return [what.split(" · ")[0] for source, what in timeline() if source == "QStash"]

    # QStash records the delivery once call-form's answer is in, a moment after the call.
    wait_until(lambda: "delivered" in qstash_states())
    assert qstash_states() == ["published", "delivering", "delivered"]

    def audit_matches() -> list[str]:
        """The page's audit entries, once they are the database's (a call's end may be coming)."""
        recorded = [event.replace("_", " ") for event in form_events(conn, form)]
        shown = [what for source, what in timeline() if source == "formcall"]
        return shown if shown == recorded else []

    assert wait_until(audit_matches)[:3] == ["delivered", "claimed", "called"]
    entries = timeline()
    assert ("Vapi", "call created") in entries
    assert call_id in web.get(f"/forms/{form}").text
    fragment = web.get(f"/forms/{form}/timeline")
    assert fragment.status_code == 200 and "<html" not in fragment.text


def test_journey_shows_the_reason_of_a_failure(web, conn, vapi):
    form = overdue_form(conn, phone="+15550100209")
    vapi.add_rule(customer_number="+15550100209", status=400)
    sweep(web)
    wait_until(lambda: form_row(conn, form)["call_status"] == "failed")
    wait_until(lambda: "gave up: moved to the DLQ" in web.get(f"/forms/{form}").text)
    page = text(web.get(f"/forms/{form}"))
    assert "failed" in page and "call refused" in page
    assert form_row(conn, form)["last_call_error"] in page
    # QStash's side: the attempt failed with call-form's own answer as the reason.
    assert re.search(
        r"attempt failed · msg_\S+ endpoint replied 489: "
        r"\{&#34;error&#34;:&#34;Vapi rejected the call",
        page,
    )


def test_journey_refuses_bad_and_unknown_ids(web):
    assert web.get("/forms/not-a-uuid").status_code == 400
    assert web.get(f"/forms/{uuid.uuid4()}").status_code == 404
    assert web.get(f"/forms/{uuid.uuid4()}/timeline").status_code == 404


def test_submit_a_form(web, conn):
    form = overdue_form(conn)
    answer = web.post(f"/forms/{form}/submit", data={"next": f"/forms/{form}"})
    assert answer.status_code == 303 and answer.headers["location"].startswith(f"/forms/{form}?")
    submitted = form_row(conn, form)["submitted_at"]
    assert submitted is not None
    again = web.post(f"/forms/{form}/submit")
    assert again.status_code == 409
    assert form_row(conn, form)["submitted_at"] == submitted
    assert web.post(f"/forms/{uuid.uuid4()}/submit").status_code == 404
    assert web.post("/forms/nope/submit").status_code == 400


def test_move_a_deadline(web, conn):
    form = overdue_form(conn)
    before = datetime.now(UTC)
    answer = web.post(f"/forms/{form}/deadline", data={"due_in_seconds": "3600"})
    assert answer.status_code == 303
    deadline = form_row(conn, form)["deadline"]
    assert timedelta(minutes=59) < deadline - before < timedelta(minutes=61)
    for bad in ("soon", "", str(10**9)):
        assert web.post(f"/forms/{form}/deadline", data={"due_in_seconds": bad}).status_code == 400
    assert form_row(conn, form)["deadline"] == deadline


def test_a_redirect_after_a_button_stays_on_this_site(web, conn):
    form = overdue_form(conn)
    answer = web.post(
        f"/forms/{form}/deadline", data={"due_in_seconds": "60", "next": "//evil.example/x"}
    )
    assert answer.headers["location"].startswith(f"/forms/{form}?notice=")


def test_create_a_test_patient_and_form(web, conn):
    page = web.get("/act")
    assert page.status_code == 200 and 'id="create-form"' in page.text
    answer = web.post(
        "/act/forms",
        data={
            "full_name": "Ada Lovelace",
            "phone": "+15550100301",
            "timezone": "Europe/London",
            "title": "Intake",
            "due_in_seconds": "30",
        },
    )
    assert answer.status_code == 303
    form = re.match(r"/forms/([0-9a-f-]{36})\?", answer.headers["location"]).group(1)
    row = form_row(conn, form)
    assert row["title"] == "Intake" and row["call_status"] == "pending"
    assert timedelta(seconds=25) < row["deadline"] - datetime.now(UTC) < timedelta(seconds=31)
    patient = conn.execute(
        "select full_name, phone, timezone from patients where id = %s", (row["patient_id"],)
    ).fetchone()
    assert patient == ("Ada Lovelace", "+15550100301", "Europe/London")
    assert f'value="{form}"' in web.get("/act").text  # now among the forms to change


@pytest.mark.parametrize(
    "field, value",
    [
        ("phone", "555-0100"),
        ("timezone", "Mars/Olympus"),
        ("due_in_seconds", "tomorrow"),
        ("full_name", "x" * 101),
    ],
)
def test_create_refuses_bad_input_and_writes_nothing(web, conn, field, value):
    fields = {
        "full_name": "Ada",
        "phone": "+15550100302",
        "timezone": "UTC",
        "title": "T",
        "due_in_seconds": "10",
        field: value,
    }
    answer = web.post("/act/forms", data=fields)
    assert answer.status_code == 400
    assert counts(conn) == (0, 0)


def test_posts_must_be_html_forms(web, conn):
    answer = web.post("/act/forms", json={"phone": "+15550100303"})
    assert answer.status_code == 400 and counts(conn) == (0, 0)


def test_qstash_page_shows_schedule_queued_messages_and_dlq(web, qstash, function_server):
    qstash.schedule.create(
        destination=f"{function_server}/api/cron/check-forms",
        cron="0 * * * *",
        schedule_id="formcall-check-forms",
    )
    qstash.schedule.pause("formcall-check-forms")
    queued = qstash.message.publish_json(
        url=f"{function_server}/api/jobs/call-form", body={"formId": str(uuid.uuid4())}, delay="1h"
    )
    page = web.get("/qstash")
    assert page.status_code == 200
    assert "formcall-check-forms" in page.text and "0 * * * *" in page.text
    assert "paused" in page.text
    assert f'data-message-id="{queued.message_id}"' in page.text
    panel = web.get("/qstash/panel")
    assert panel.status_code == 200 and "<html" not in panel.text
    qstash.message.cancel(queued.message_id)


def dead_letter(web, conn, vapi, qstash) -> tuple[str, str]:
    """A form whose call Vapi rejects: call-form answers 489 and QStash moves it to the DLQ."""
    form = overdue_form(conn, phone="+15550100401")
    vapi.add_rule(customer_number="+15550100401", status=400, times=1)
    sweep(web)
    wait_until(lambda: qstash.dlq.list().messages)
    [entry] = qstash.dlq.list().messages
    return form, entry.dlq_id


def test_dlq_retry_publishes_the_message_again_and_it_is_delivered(web, conn, vapi, qstash):
    form, dlq_id = dead_letter(web, conn, vapi, qstash)
    page = web.get("/qstash")
    assert f'data-dlq-id="{dlq_id}"' in page.text
    assert f'data-dlq-id="{dlq_id}"' in web.get(f"/forms/{form}").text  # its journey shows it
    delivered = form_events(conn, form).count("delivered")
    answer = web.post(f"/qstash/dlq/{dlq_id}/retry", data={"next": "/qstash"})
    assert answer.status_code == 303 and "published%20again" in answer.headers["location"]
    assert qstash.dlq.list().messages == []
    # A new message with the same body reaches call-form, which answers for the failed form.
    wait_until(lambda: form_events(conn, form).count("delivered") == delivered + 1)
    assert form_events(conn, form)[-1] == "skipped"
    assert web.post(f"/qstash/dlq/{dlq_id}/retry").status_code == 404


def test_dlq_delete(web, conn, vapi, qstash):
    _, dlq_id = dead_letter(web, conn, vapi, qstash)
    answer = web.post(f"/qstash/dlq/{dlq_id}/delete")
    assert answer.status_code == 303
    assert qstash.dlq.list().messages == []
    assert web.post(f"/qstash/dlq/{dlq_id}/delete").status_code == 404
    assert web.post("/qstash/dlq/..%2f..%2fetc/delete").status_code in (400, 404)


def test_hold_makes_calls_ring_until_played(web, vapi):
    assert 'id="hold-toggle"' in web.get("/act/calls").text
    answer = web.post("/act/hold", data={"hold": "on"})
    assert answer.status_code == 303 and vapi.stats()["hold"] is True
    assert "ring until you play the patient" in web.get("/act/calls").text
    assert web.post("/act/hold", data={"hold": "maybe"}).status_code == 400
    assert vapi.stats()["hold"] is True
    web.post("/act/hold", data={"hold": "off"})
    assert vapi.stats()["hold"] is False


def test_play_the_patient_ends_a_ringing_call_that_way(web, conn, vapi):
    vapi.configure(hold=True)
    form = overdue_form(conn)
    sweep(web)
    wait_until(lambda: form_row(conn, form)["call_status"] == "called")
    call_id = form_row(conn, form)["vapi_call_id"]
    fragment = web.get("/act/calls").text
    assert re.search(f'data-call-id="{call_id}" data-status="ringing"', fragment)
    for label in ("answer", "don&#39;t answer", "voicemail", "busy", "opt out"):
        assert f">{label}</button>" in fragment
    assert f"/act/calls/{call_id}/end" in web.get("/act").text
    assert f"/act/calls/{call_id}/end" in web.get(f"/forms/{form}").text  # on its journey too
    answer = web.post(
        f"/act/calls/{call_id}/end", data={"outcome": "no_answer", "next": f"/forms/{form}"}
    )
    assert answer.status_code == 303
    assert answer.headers["location"].startswith(f"/forms/{form}?notice=")
    call = vapi.get_call(call_id)
    assert (call["status"], call["endedReason"]) == ("ended", "customer-did-not-answer")
    assert f'data-call-id="{call_id}"' not in web.get("/act/calls").text
    timeline = web.get(f"/forms/{form}").text
    assert 'data-what="call ended"' in timeline and "customer-did-not-answer" in timeline
    # Ended already: the fake Vapi refuses, and the console says so.
    assert web.post(f"/act/calls/{call_id}/end", data={"outcome": "busy"}).status_code == 409


def test_dont_answer_shows_the_outcome_and_the_follow_up(
    web, conn, vapi, monkeypatch, function_server
):
    from formcall import clients

    # The fake Vapi reports to call-events on the function server, as Vapi would.
    monkeypatch.setenv("CALL_EVENTS_URL", f"{function_server}/api/webhooks/vapi")
    clients.reset()
    vapi.configure(hold=True)
    form = overdue_form(conn)
    sweep(web)
    wait_until(lambda: form_row(conn, form)["call_status"] == "called")
    call_id = form_row(conn, form)["vapi_call_id"]
    web.post(f"/act/calls/{call_id}/end", data={"outcome": "no_answer"})
    row = wait_until(lambda: (r := form_row(conn, form))["call_outcome"] and r)
    assert (row["call_status"], row["call_outcome"]) == ("pending", "no_answer")
    assert row["next_call_at"] > datetime.now(UTC)
    listed = web.get("/forms/rows", params={"outcome": "no_answer"}).text
    assert f'data-form-id="{form}"' in listed
    next_call = row["next_call_at"].astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    assert next_call in listed
    journey = web.get(f"/forms/{form}").text
    assert 'data-what="call ended"' in journey and "no_answer (customer-did-not-answer)" in journey
    assert 'data-what="follow up scheduled"' in journey
    assert re.search(
        r'id="recorded-calls".*?<td class="outcome">no_answer</td>', journey, re.DOTALL
    )
    assert next_call in text(web.get(f"/forms/{form}/timeline"))


def test_playing_the_patient_refuses_bad_input(web):
    call = str(uuid.uuid4())
    assert web.post(f"/act/calls/{call}/end", data={"outcome": "hang_up"}).status_code == 400
    assert web.post("/act/calls/not-a-call/end", data={"outcome": "busy"}).status_code == 400
    assert web.post(f"/act/calls/{call}/end", data={"outcome": "busy"}).status_code == 404


def test_other_host_names_and_cross_site_posts_are_refused(web, conn):
    form = overdue_form(conn)
    assert web.get("/forms", headers={"host": "evil.example"}).status_code == 400
    answer = web.post(f"/forms/{form}/submit", headers={"origin": "http://evil.example"})
    assert answer.status_code == 403
    answer = web.post(f"/forms/{form}/submit", headers={"sec-fetch-site": "cross-site"})
    assert answer.status_code == 403
    assert form_row(conn, form)["submitted_at"] is None
    same_site = web.post(
        f"/forms/{form}/submit",
        headers={"origin": web.base_url.scheme + "://" + web.base_url.netloc.decode()},
    )
    assert same_site.status_code == 303


def test_unknown_routes_and_methods(web):
    assert web.get("/nowhere").status_code == 404
    assert web.get("/act/sweep").status_code == 405
    assert web.get("/static/console.js").status_code == 200
    assert web.get("/static/console.css").status_code == 200


@pytest.fixture
def cut_off_console(pg_dsn, keys, db):
    """A console whose QStash, Vapi and check-forms are not there (ports nobody listens on)."""
    dead = f"http://127.0.0.1:{free_port()}"
    config = ConsoleConfig(
        dsn=pg_dsn,
        qstash_url=dead,
        qstash_token="t",
        check_forms_url=dead,
        cron_secret="s" * 20,
        vapi_url=dead,
        vapi_key="k",
    )
    handle = serve_in_thread(create_app(config))
    with httpx.Client(base_url=handle.url, timeout=30) as client:
        yield client
    handle.stop()


def test_pages_still_show_the_database_when_qstash_and_vapi_are_down(cut_off_console, conn):
    form = overdue_form(conn)
    page = cut_off_console.get("/forms")
    assert page.status_code == 200 and f'data-form-id="{form}"' in page.text
    assert "QStash not reachable" in page.text
    journey = cut_off_console.get(f"/forms/{form}")
    assert journey.status_code == 200 and "not reachable" in journey.text
    assert cut_off_console.get("/qstash").status_code == 200
    assert cut_off_console.get("/act").status_code == 200
    # An action that needs the missing service is a transient failure: 503, nothing changed.
    assert cut_off_console.post("/act/sweep").status_code == 503
    assert cut_off_console.post("/qstash/dlq/1-0/retry").status_code == 503


def test_a_database_that_is_down_is_a_503(keys):
    dead = f"http://127.0.0.1:{free_port()}"
    config = ConsoleConfig(
        dsn=f"postgresql://postgres@127.0.0.1:{free_port()}/postgres",
        qstash_url=dead,
        qstash_token="t",
        check_forms_url=dead,
        cron_secret="s" * 20,
        vapi_url=None,
        vapi_key="",
    )
    handle = serve_in_thread(create_app(config))
    try:
        answer = httpx.get(f"{handle.url}/forms", timeout=30)
        assert answer.status_code == 503 and "database is not reachable" in answer.text
        assert "postgresql://" not in answer.text
    finally:
        handle.stop()


def test_config_from_the_stack_environment():
    env = {
        "FORMCALL_DEV_DSN": "postgresql://x",
        "QSTASH_URL": "http://q",
        "QSTASH_TOKEN": "t",
        "CHECK_FORMS_URL": "http://f/api/cron/check-forms",
        "CRON_SECRET": "c",
        "VAPI_BASE_URL": "http://v",
        "VAPI_PRIVATE_KEY": "k",
    }
    assert ConsoleConfig.from_env(env).vapi_url == "http://v"
    assert ConsoleConfig.from_env({**env, "FORMCALL_DEV_REAL_VAPI": "1"}).vapi_url is None
