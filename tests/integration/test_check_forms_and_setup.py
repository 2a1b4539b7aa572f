"""check-forms and setup against the local QStash server (the official client over real HTTP)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from qstash import QStash

from formcall import clients, settings
from formcall.schedule import sync_form_schedule
from formcall.signatures import sign
from formcall.sweep import CHECK_FORMS_SCHEDULE_ID
from formcall_cli.events import http_event
from formcall_dev.polling import wait_until
from formcall_dev.seed import create_form, create_patient
from tests.support.lambda_handlers import DOMAIN, invoke
from tests.support.reads import form_row


@pytest.fixture(autouse=True)
def no_schedule_left(local_qstash, keys):
    """A schedule left in place would sweep at the top of the hour, in the middle of a test."""
    yield
    client = QStash(keys.qstash_token, base_url=local_qstash, retry=False)
    for schedule in client.schedule.list():
        client.schedule.delete(schedule.schedule_id)


def manual_trigger(secret: str | None, **kwargs) -> dict:
    headers = {"authorization": f"Bearer {secret}"} if secret else {}
    return http_event(
        method="GET", path="/api/cron/check-forms", headers=headers, domain=DOMAIN, **kwargs
    )


def qstash_stats(url: str, token: str) -> dict:
    return httpx.get(f"{url}/v2/_local/stats", headers={"Authorization": f"Bearer {token}"}).json()


def seed_mix(conn) -> dict[str, list[str]]:
    """Overdue forms, plus every kind the sweep must leave alone."""
    patient = create_patient(conn)
    now = datetime.now(UTC)
    overdue = [
        create_form(conn, patient_id=patient, deadline=now - timedelta(minutes=m))
        for m in (1, 30, 600)
    ]
    untouched = [
        create_form(conn, patient_id=patient, deadline=now + timedelta(hours=1)),
        create_form(conn, patient_id=patient, deadline=None),
        create_form(
            conn,
            patient_id=patient,
            deadline=now - timedelta(hours=1),
            submitted_at=now - timedelta(hours=2),
        ),
    ]
    called = create_form(conn, patient_id=patient, deadline=now - timedelta(hours=3))
    conn.execute(
        "update forms set call_status = 'called', vapi_call_id = 'earlier' where id = %s", (called,)
    )
    return {"overdue": overdue, "untouched": untouched + [called]}


def test_manual_sweep_enqueues_each_overdue_form_and_each_gets_one_call(
    stack_env, vapi, conn, keys
):
    forms = seed_mix(conn)
    answer = invoke("check_forms", manual_trigger(keys.cron_secret))
    assert answer.status == 200
    assert answer.body == {
        "success": True,
        "found": 3,
        "enqueued": 3,
        "failed": 0,
        "reconciled": {"found": 0, "released": 0, "unresolved": 0},
        "outcomes": {"ended": 0, "open": 0, "unresolved": 0},
    }
    wait_until(lambda: all(form_row(conn, f)["call_status"] == "called" for f in forms["overdue"]))
    for form in forms["overdue"]:
        assert len(vapi.calls_for_form(form)) == 1
    for form in forms["untouched"]:
        assert vapi.calls_for_form(form) == []
    # The three overdue forms are the same patient's: one call covers them all.
    assert len(vapi.requests) == 1
    assert sorted(vapi.requests[0].body["assistantOverrides"]["metadata"]["formIds"]) == sorted(
        forms["overdue"]
    )


def test_second_sweep_finds_nothing_left(stack_env, vapi, conn, keys):
    forms = seed_mix(conn)
    invoke("check_forms", manual_trigger(keys.cron_secret))
    wait_until(lambda: all(form_row(conn, f)["call_status"] == "called" for f in forms["overdue"]))
    again = invoke("check_forms", manual_trigger(keys.cron_secret))
    assert (again.body["found"], again.body["enqueued"]) == (0, 0)


@pytest.mark.parametrize(
    "event_kwargs",
    [
        {"secret": None},
        {"secret": "wrong-secret-of-some-length"},
        {"secret": "short"},
    ],
)
def test_manual_trigger_without_the_secret_is_refused(stack_env, vapi, conn, keys, event_kwargs):
    forms = seed_mix(conn)
    answer = invoke("check_forms", manual_trigger(event_kwargs["secret"]))
    assert (answer.status, answer.body) == (401, {"error": "unauthorized"})
    assert form_row(conn, forms["overdue"][0])["call_status"] == "pending"


def test_secret_in_the_query_string_does_not_trigger_the_sweep(stack_env, vapi, keys):
    answer = invoke("check_forms", manual_trigger(None, query={"secret": keys.cron_secret}))
    assert answer.status == 401


def test_unsigned_post_is_refused(stack_env, vapi, keys):
    event = http_event(
        method="POST",
        path="/",
        domain=DOMAIN,
        headers={"authorization": f"Bearer {keys.cron_secret}"},
    )
    assert invoke("check_forms", event).status == 401


def test_signed_post_from_the_schedule_sweeps(stack_env, vapi, conn, keys):
    seed_mix(conn)
    url = f"https://{DOMAIN}/"
    event = http_event(
        method="POST",
        path="/",
        domain=DOMAIN,
        headers={
            "upstash-signature": sign(key=keys.current_key, url=url, body=b""),
            "upstash-schedule-id": CHECK_FORMS_SCHEDULE_ID,
        },
    )
    answer = invoke("check_forms", event)
    assert (answer.status, answer.body["found"]) == (200, 3)


def test_backlog_goes_out_in_batches_of_100(stack_env, vapi, conn, keys, monkeypatch):
    # Lines for all: only the sweep's batches go to QStash (no form waits to be woken).
    monkeypatch.setenv("VAPI_MAX_CONCURRENCY", "1000")
    clients.reset()
    past = datetime.now(UTC) - timedelta(minutes=5)
    with conn.transaction():
        ids = [
            create_form(
                conn, patient_id=create_patient(conn, phone=f"+1555020{n:04d}"), deadline=past
            )
            for n in range(250)
        ]
    vapi.configure(concurrency_limit=1000)
    before = qstash_stats(stack_env["QSTASH_URL"], keys.qstash_token)["requests"]
    answer = invoke("check_forms", manual_trigger(keys.cron_secret))
    assert answer.body["found"] == 250 and answer.body["enqueued"] == 250
    after = qstash_stats(stack_env["QSTASH_URL"], keys.qstash_token)["requests"]
    assert after["batch"] - before.get("batch", 0) == 3
    assert after["batchMessages"] - before.get("batchMessages", 0) == 250
    wait_until(
        lambda: (
            conn.execute("select count(*) from forms where call_status = 'called'").fetchone()[0]
            == 250
        ),
        timeout=60,
    )
    assert sorted({len(vapi.calls_for_form(f)) for f in ids}) == [1]


def test_qstash_down_is_reported_not_fatal(stack_env, vapi, conn, keys, monkeypatch):
    forms = seed_mix(conn)
    monkeypatch.setenv("QSTASH_URL", "http://127.0.0.1:1")
    clients.reset()
    answer = invoke("check_forms", manual_trigger(keys.cron_secret))
    assert answer.status == 200
    assert answer.body | {"reconciled": None, "outcomes": None} == {
        "success": True,
        "found": 3,
        "enqueued": 0,
        "failed": 3,
        "reconciled": None,
        "outcomes": None,
    }
    assert all(form_row(conn, f)["call_status"] == "pending" for f in forms["overdue"])


def test_sweep_racing_the_deadline_jobs_gives_one_call_per_form(stack_env, vapi, conn, keys):
    """The one-time messages and two sweeps all fire at once: still one call per form."""
    patient = create_patient(conn)
    past = datetime.now(UTC) - timedelta(seconds=1)
    forms = [create_form(conn, patient_id=patient, deadline=past) for _ in range(20)]
    vapi.configure(latency=0.05, concurrency_limit=100)
    publisher = clients.publisher(settings.load(settings.CheckFormsSettings))

    def deadline_job(form_id):
        config = settings.load(settings.CheckFormsSettings)
        return sync_form_schedule(
            form_id,
            store=clients.store(config),
            publisher=publisher,
            call_form_url=stack_env["CALL_FORM_URL"],
            window=clients.window(config),
        )

    with ThreadPoolExecutor(8) as pool:
        # Over HTTP: Lambda runs one invocation per process, a server runs many at once.
        sweeps = [
            pool.submit(
                httpx.get,
                stack_env["CHECK_FORMS_URL"],
                timeout=60,
                headers={"Authorization": f"Bearer {keys.cron_secret}"},
            )
            for _ in range(2)
        ]
        list(pool.map(deadline_job, forms))
        assert all(s.result().status_code == 200 for s in sweeps)
    wait_until(lambda: all(form_row(conn, f)["call_status"] == "called" for f in forms), timeout=30)
    assert [len(vapi.calls_for_form(f)) for f in forms] == [1] * 20


def test_stale_claim_is_reconciled_by_the_sweep(stack_env, vapi, conn, keys):
    patient = create_patient(conn)
    form = create_form(conn, patient_id=patient, deadline=datetime.now(UTC) - timedelta(hours=1))
    # A claim from a process that died before calling Vapi, older than the lease.
    conn.execute("select claim_form_call(%s)", (form,))
    conn.execute("update calls set created_at = now() - interval '1 hour'")
    answer = invoke("check_forms", manual_trigger(keys.cron_secret))
    assert answer.body["reconciled"] == {"found": 0, "released": 1, "unresolved": 0}
    assert answer.body["enqueued"] == 1
    wait_until(lambda: form_row(conn, form)["call_status"] == "called")
    assert len(vapi.calls_for_form(form)) == 1


def setup_event(**kwargs) -> dict:
    return http_event(method="GET", path="/api/setup-qstash", domain=DOMAIN, **kwargs)


def test_setup_twice_leaves_one_schedule(stack_env, keys):
    for _ in range(2):
        answer = invoke("setup", setup_event(query={"secret": keys.cron_secret}))
        assert answer.status == 200
        assert answer.body["success"] is True
        assert answer.body["schedule"]["scheduleId"] == CHECK_FORMS_SCHEDULE_ID
        assert answer.body["schedule"]["cron"] == "0 * * * *"
    schedules = QStash(
        keys.qstash_token, base_url=stack_env["QSTASH_URL"], retry=False
    ).schedule.list()
    assert [(s.schedule_id, s.cron, s.destination) for s in schedules] == [
        (CHECK_FORMS_SCHEDULE_ID, "0 * * * *", stack_env["CHECK_FORMS_URL"])
    ]


def test_setup_accepts_the_bearer_header(stack_env, keys):
    answer = invoke("setup", setup_event(headers={"authorization": f"Bearer {keys.cron_secret}"}))
    assert answer.status == 200


@pytest.mark.parametrize(
    "kwargs", [{}, {"query": {"secret": "nope"}}, {"headers": {"authorization": "Basic abc"}}]
)
def test_setup_without_the_secret_is_refused(stack_env, keys, kwargs):
    assert invoke("setup", setup_event(**kwargs)).status == 401


def test_sweep_with_a_refused_qstash_token_names_the_setting(
    stack_env, vapi, conn, keys, monkeypatch
):
    seed_mix(conn)
    monkeypatch.setenv("QSTASH_TOKEN", "not-the-token")
    clients.reset()
    answer = invoke("check_forms", manual_trigger(keys.cron_secret))
    assert (answer.status, answer.body["settings"]) == (500, ["QSTASH_TOKEN"])


def test_sweep_with_nothing_overdue_never_builds_a_publisher(stack_env, vapi):
    from formcall.sweep import sweep_overdue_forms

    def no_publisher():
        raise AssertionError("nothing to enqueue: the QStash client must not be built")

    config = settings.load(settings.CheckFormsSettings)
    report = sweep_overdue_forms(
        store=clients.store(config),
        vapi=clients.vapi(config),
        publisher=no_publisher,
        call_form_url=stack_env["CALL_FORM_URL"],
        window=clients.window(config),
    )
    assert (report.found, report.enqueued, report.failed) == (0, 0, 0)


def test_setup_with_a_refused_qstash_token_names_the_setting(stack_env, keys, monkeypatch):
    monkeypatch.setenv("QSTASH_TOKEN", "not-the-token")
    clients.reset()
    answer = invoke("setup", setup_event(query={"secret": keys.cron_secret}))
    assert (answer.status, answer.body["settings"]) == (500, ["QSTASH_TOKEN"])


def test_the_schedule_fires_a_signed_sweep(stack_env, vapi, conn, keys):
    forms = seed_mix(conn)
    invoke("setup", setup_event(query={"secret": keys.cron_secret}))
    fired = httpx.post(
        f"{stack_env['QSTASH_URL']}/v2/_local/schedules/{CHECK_FORMS_SCHEDULE_ID}/trigger",
        headers={"Authorization": f"Bearer {keys.qstash_token}"},
    )
    assert fired.status_code < 300
    wait_until(lambda: all(form_row(conn, f)["call_status"] == "called" for f in forms["overdue"]))
