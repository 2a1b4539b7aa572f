"""Integration fixtures: the fake Vapi over HTTP, settings pointing at the real database, Lambda plumbing."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from formcall import clients
from formcall_dev.seed import create_form, create_patient
from formcall_dev.servers import serve_in_thread
from formcall_dev.vapi.fake import FakeVapi
from tests.support.lambda_handlers import DOMAIN, EVENTS_DOMAIN


@dataclass(frozen=True)
class Secrets:
    current_key: str
    next_key: str
    cron_secret: str
    qstash_token: str
    vapi_key: str
    service_role_key: str
    vapi_webhook_secret: str


@pytest.fixture(scope="session")
def keys() -> Secrets:
    def key() -> str:
        return "sig_" + secrets.token_urlsafe(21)

    return Secrets(
        current_key=key(),
        next_key=key(),
        cron_secret=secrets.token_urlsafe(24),
        qstash_token=secrets.token_urlsafe(24),
        vapi_key=secrets.token_urlsafe(24),
        service_role_key=secrets.token_urlsafe(24),
        vapi_webhook_secret=secrets.token_urlsafe(24),
    )


@pytest.fixture(scope="session")
def vapi_server(keys):
    fake = FakeVapi(api_key=keys.vapi_key)
    handle = serve_in_thread(fake.app)
    yield fake, handle.url
    handle.stop()


@pytest.fixture
def vapi(vapi_server, keys) -> FakeVapi:
    fake, _ = vapi_server
    fake.reset()
    fake.api_key = keys.vapi_key  # a test may have rotated it
    fake.configure(concurrency_limit=10, call_duration=0.0, latency=0.0)
    return fake


@pytest.fixture
def env(monkeypatch, db, keys, vapi_server):
    """Settings for every function: direct Postgres, the fake Vapi, generated QStash keys."""
    _, vapi_url = vapi_server
    values = {
        "DATABASE_URL": db,
        "QSTASH_CURRENT_SIGNING_KEY": keys.current_key,
        "QSTASH_NEXT_SIGNING_KEY": keys.next_key,
        "QSTASH_TOKEN": keys.qstash_token,
        "CRON_SECRET": keys.cron_secret,
        "VAPI_PRIVATE_KEY": keys.vapi_key,
        "VAPI_ASSISTANT_ID": "asst-test",
        "VAPI_PHONE_NUMBER_ID": "phone-test",
        "VAPI_BASE_URL": vapi_url,
        "VAPI_TIMEOUT_SECONDS": "2",
        # Tests run at any hour; the calling window has tests of its own.
        "CALL_WINDOW": "00:00-23:59:59",
        # call-form's own URL (signed deliveries in these tests arrive on it).
        "CALL_FORM_URL": f"https://{DOMAIN}/",
        "CALL_EVENTS_URL": f"https://{EVENTS_DOMAIN}/",
        "VAPI_WEBHOOK_SECRET": keys.vapi_webhook_secret,
    }
    for name in (
        "SUPABASE_URL",
        "NEXT_PUBLIC_SUPABASE_URL",
        "SUPABASE_SERVICE_ROLE_KEY",
        "CHECK_FORMS_URL",
        "QSTASH_URL",
        "FAILURE_CALLBACK_URL",
        "WEBHOOK_SECRET",
        "VAPI_MAX_CONCURRENCY",
        "VAPI_CALLS_PER_MINUTE",
        "VAPI_SERVER_CREDENTIAL_ID",
        "MAX_CALLS_PER_FORM",
        "FOLLOW_UP_ON",
        "FOLLOW_UP_DELAY_SECONDS",
        "PATIENT_MAX_CALLS_PER_DAY",
        "PATIENT_MAX_CALLS_PER_WEEK",
        "CALL_OUTCOME_TIMEOUT_SECONDS",
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    clients.reset()
    yield values
    clients.reset()


@pytest.fixture
def conn(db):
    with psycopg.connect(db, autocommit=True) as connection:
        yield connection


@pytest.fixture
def due_form(conn):
    """A form whose deadline passed a minute ago."""
    patient = create_patient(conn, full_name="Ada Lovelace", phone="+15550100001")
    return create_form(
        conn,
        patient_id=patient,
        title="Pre-visit questionnaire",
        deadline=datetime.now(UTC) - timedelta(minutes=1),
    )


@pytest.fixture(scope="module")
def local_qstash(pg_dsn, keys, request):
    """The local QStash server (real HTTP, its queue in Postgres), backoff 100x faster."""
    from formcall_dev.qstash import server as qstash_server

    schema = "qstash_" + request.module.__name__.rsplit(".", 1)[-1]
    app = qstash_server.create_app(
        dsn=pg_dsn,
        token=keys.qstash_token,
        current_signing_key=keys.current_key,
        next_signing_key=keys.next_key,
        schema=schema,
        time_scale=0.01,
    )
    handle = serve_in_thread(app)
    yield handle.url
    handle.stop()


@pytest.fixture(scope="module")
def function_server():
    from formcall_dev import functions_server

    handle = serve_in_thread(functions_server.create_app())
    yield handle.url
    handle.stop()


@pytest.fixture
def stack_env(env, monkeypatch, local_qstash, function_server):
    """env plus the local QStash and the function server's URLs."""
    values = {
        "QSTASH_URL": local_qstash,
        # Flow control is tested on its own; here it must not slow the sweep tests.
        "VAPI_MAX_CONCURRENCY": "100",
        "VAPI_CALLS_PER_MINUTE": "60000",
        "CALL_FORM_URL": f"{function_server}/api/jobs/call-form",
        "CHECK_FORMS_URL": f"{function_server}/api/cron/check-forms",
        # The fake Vapi's reports reach call-events: calls end, lines free up.
        "CALL_EVENTS_URL": f"{function_server}/api/webhooks/vapi",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    clients.reset()
    return {**env, **values}
