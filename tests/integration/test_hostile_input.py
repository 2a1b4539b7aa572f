"""Hostile and malformed input against every endpoint, served by the real function app over HTTP.

schemathesis generates requests from docs/openapi.yaml (valid and invalid bodies, wrong types,
junk in every header and query parameter the description names, missing credentials, other
methods); hypothesis strategies add what a description cannot say: raw bodies (huge, invalid
UTF-8, deeply nested), repeated and oversized headers, near misses of the real secrets, and
garbage that carries a valid signature or the real webhook secret (QStash or Supabase sending
something odd). After every case: no 5xx (not even the documented transient 503: nothing is
attempted), no database write (forms, form_call_events and patients fingerprinted), no Vapi
request, nothing published to QStash. `make test` runs a few hundred cases; `make chaos` sets
FORMCALL_HOSTILE_CASES (10,000)
and FORMCALL_HOSTILE_FIGURES (where the counts go).
"""

from __future__ import annotations

import base64
import json
import math
import os
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg
import pytest
import schemathesis
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from formcall import clients
from formcall.signatures import sign
from formcall_cli.events import webhook_headers
from formcall_dev.seed import create_form, create_patient

ROOT = Path(__file__).resolve().parents[2]
WEBHOOK_SECRET = "webhook-secret-for-hostile-tests-0123"
VAPI_WEBHOOK_SECRET = "hostile-vapi-webhook-secret"
PATHS = {
    "call_form": "/api/jobs/call-form",
    "check_forms": "/api/cron/check-forms",
    "setup": "/api/setup-qstash",
    "schedule_form": "/api/webhooks/forms",
    "failure_callback": "/api/jobs/failed",
    "call_events": "/api/webhooks/vapi",
}

# The whole budget of generated cases; make chaos raises it to 10,000.
BUDGET = int(os.environ.get("FORMCALL_HOSTILE_CASES") or 400)
CASES: Counter[str] = Counter()
STATUSES: Counter[str] = Counter()


def examples(share: float) -> int:
    return max(10, math.ceil(BUDGET * share))


def hostile(share: float) -> settings:
    """This test's share of the budget; reproducible in make test, fresh cases in make chaos."""
    return settings(
        max_examples=examples(share),
        deadline=None,
        database=None,
        derandomize=not os.environ.get("FORMCALL_HOSTILE_CASES"),
        suppress_health_check=list(HealthCheck),
    )


class Target:
    """The served app, its dependencies and the invariants every case must keep."""

    def __init__(self, base: str, conn: psycopg.Connection, vapi, qstash_url: str, keys) -> None:
        self.base = base
        self.conn = conn
        self.vapi = vapi
        self.qstash_url = qstash_url
        self.keys = keys
        self.http = httpx.Client(base_url=base, timeout=30)
        import requests

        self.session = requests.Session()  # schemathesis' transport, kept alive
        self.baseline = self.fingerprint()
        self.qstash_writes = self.qstash_write_count()

    def fingerprint(self) -> tuple:
        return self.conn.execute(
            "select (select md5(coalesce(string_agg(f::text, '|' order by f.id), '')) from forms f),"
            " (select count(*) from form_call_events), (select max(id) from form_call_events),"
            " (select md5(coalesce(string_agg(p::text, '|' order by p.id), '')) from patients p)"
        ).fetchone()

    def qstash_write_count(self) -> int:
        stats = httpx.get(
            f"{self.qstash_url}/v2/_local/stats",
            headers={"Authorization": f"Bearer {self.keys.qstash_token}"},
        ).json()["requests"]
        return stats["publish"] + stats["batch"] + stats["schedules"]

    def check(
        self,
        label: str,
        answer: httpx.Response,
        *,
        allowed: set[int] | None = None,
        qstash: bool = False,
    ) -> None:
        """The invariants of every hostile case."""
        CASES[label] += 1
        STATUSES[str(answer.status_code)] += 1
        status = answer.status_code
        # Not even the documented transient 503: a refused request attempts nothing.
        assert status < 500, (label, status, answer.text[:300])
        if allowed is not None:
            assert status in allowed, (label, status, answer.text[:300])
        if answer.content:
            assert "error" in answer.json() or status < 300, answer.text[:300]
        assert self.vapi.requests == [], label
        assert self.fingerprint() == self.baseline, label
        if not qstash:
            assert self.qstash_write_count() == self.qstash_writes, label

    def signed(self, path: str, body: bytes) -> dict[str, str]:
        return {
            "upstash-signature": sign(
                key=self.keys.current_key, url=f"{self.base}{path}", body=body
            ),
            "content-type": "application/json",
        }


@pytest.fixture(scope="module")
def target(pg_dsn, keys, vapi_server, local_qstash, function_server):
    """Settings as stack_env, a webhook secret, a schedule in place, bait forms in the database."""
    fake, vapi_url = vapi_server
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {
            "DATABASE_URL": pg_dsn,
            "QSTASH_URL": local_qstash,
            "QSTASH_TOKEN": keys.qstash_token,
            "QSTASH_CURRENT_SIGNING_KEY": keys.current_key,
            "QSTASH_NEXT_SIGNING_KEY": keys.next_key,
            "CRON_SECRET": keys.cron_secret,
            "WEBHOOK_SECRET": WEBHOOK_SECRET,
            "VAPI_PRIVATE_KEY": keys.vapi_key,
            "VAPI_ASSISTANT_ID": "asst-test",
            "VAPI_PHONE_NUMBER_ID": "phone-test",
            "VAPI_BASE_URL": vapi_url,
            "VAPI_TIMEOUT_SECONDS": "2",
            "CALL_WINDOW": "00:00-23:59:59",
            "VAPI_MAX_CONCURRENCY": "100",
            "VAPI_CALLS_PER_MINUTE": "60000",
            "CALL_FORM_URL": f"{function_server}{PATHS['call_form']}",
            "CHECK_FORMS_URL": f"{function_server}{PATHS['check_forms']}",
            "FAILURE_CALLBACK_URL": f"{function_server}{PATHS['failure_callback']}",
            "CALL_EVENTS_URL": f"{function_server}/api/webhooks/vapi",
            "VAPI_WEBHOOK_SECRET": VAPI_WEBHOOK_SECRET,
        }.items():
            patch.setenv(name, value)
        for name in ("SUPABASE_URL", "NEXT_PUBLIC_SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY"):
            patch.delenv(name, raising=False)
        clients.reset()
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("truncate form_call_events, forms, patients cascade")
            now = datetime.now(UTC)
            patient = create_patient(conn, full_name="Bait Patient", phone="+15550100999")
            # A due form is the bait: any request that gets through would call it.
            for deadline, submitted in (
                (now - timedelta(minutes=5), None),
                (now + timedelta(days=2), None),
                (now - timedelta(hours=1), now - timedelta(hours=2)),
            ):
                create_form(
                    conn, patient_id=patient, deadline=deadline, submitted_at=submitted, silent=True
                )
            setup = httpx.get(
                f"{function_server}{PATHS['setup']}",
                params={"secret": keys.cron_secret},
                timeout=30,
            )
            assert setup.status_code == 200
            # Paused: an hourly tick during the run would sweep the bait (a real write) and
            # look like a hostile request getting through.
            httpx.patch(
                f"{local_qstash}/v2/schedules/formcall-check-forms/pause",
                headers={"Authorization": f"Bearer {keys.qstash_token}"},
            ).raise_for_status()
            fake.reset()
            subject = Target(function_server, conn, fake, local_qstash, keys)
            yield subject
            subject.http.close()
            schedules = httpx.get(
                f"{local_qstash}/v2/schedules",
                headers={"Authorization": f"Bearer {keys.qstash_token}"},
            ).json()
            assert [s["scheduleId"] for s in schedules] == ["formcall-check-forms"]
            conn.execute("truncate form_call_events, forms, patients cascade")
        clients.reset()
    write_figures()


def write_figures() -> None:
    path = os.environ.get("FORMCALL_HOSTILE_FIGURES")
    if not path:
        return
    try:
        figures = json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        figures = {}
    for label, count in CASES.items():
        figures[label] = figures.get(label, 0) + count
    figures["total"] = sum(
        v for k, v in figures.items() if k not in ("total",) and not k.startswith("answers")
    )
    for status, count in STATUSES.items():
        figures[f"answers {status}"] = figures.get(f"answers {status}", 0) + count
    Path(path).write_text(json.dumps(figures, indent=2, sort_keys=True))


# ---- schemathesis, from docs/openapi.yaml ------------------------------------------------------

schema = schemathesis.openapi.from_path(ROOT / "docs" / "openapi.yaml")
schema.config.generation.update(
    modes=[schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE],
    max_examples=examples(0.08),
    with_security_parameters=True,
)
API_CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
    "negative_data_rejection",
    "unsupported_method",
    "missing_required_header",
]
CHECK_FUNCTIONS = [schemathesis.checks.CHECKS.get_one(name) for name in API_CHECKS]


@schema.parametrize()
def test_schemathesis_cases_never_get_through(case, target):
    answer = case.call(base_url=target.base, session=target.session)
    case.validate_response(answer, checks=CHECK_FUNCTIONS)
    CASES[f"schemathesis {case.operation.label}"] += 1
    STATUSES[str(answer.status_code)] += 1
    assert answer.status_code in (400, 401, 405, 413), (case.operation.label, answer.status_code)
    assert target.vapi.requests == []
    assert target.fingerprint() == target.baseline


# ---- hypothesis: what a description cannot say ---------------------------------------------------

METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]
# Header values travel as latin-1; keep to what an HTTP client can send.
header_text = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f"), max_size=300
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=20,
)
raw_bodies = st.one_of(
    st.binary(max_size=2000),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.text(max_size=500).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.integers(1, 30_000).map(lambda depth: b"[" * depth + b"]" * depth),
    st.integers(1, 20_000).map(lambda depth: b'{"a":' * depth + b"1" + b"}" * depth),
    st.integers(60_000, 300_000).map(lambda size: b'{"formId": "' + b"x" * size + b'"}'),
    st.sampled_from(
        [
            b"",
            b"null",
            b"{}",
            b"[]",
            b'"x"',
            b"\xff\xfe\x00",
            b"\x00" * 10,
            b'{"formId": "\\u0000"}',
            b'{"formId": null}',
        ]
    ),
)
form_ids = st.one_of(
    st.uuids().map(str),
    st.text(max_size=60),
    st.integers(),
    st.none(),
    st.booleans(),
    st.lists(st.uuids().map(str), max_size=2),
    st.uuids().map(lambda u: str(u).upper()),
    st.uuids().map(lambda u: u.hex),
    st.uuids().map(lambda u: f"{u}\u0000"),
    st.uuids().map(lambda u: f" {u} "),
    st.uuids().map(lambda u: f"{{{u}}}"),
    st.just("../../etc/passwd"),
    st.just("6f1c1b9e-2a53-4c1e-9d55-0a5b3f7f2c1\u0661"),
)


def junk_headers(secret_like: str) -> st.SearchStrategy[list[tuple[str, str]]]:
    names = st.sampled_from(
        [
            "upstash-signature",
            "authorization",
            "x-webhook-secret",
            "upstash-message-id",
            "upstash-retried",
            "content-type",
            "x-forwarded-proto",
            "x-forwarded-host",
            "host-override",
            "content-encoding",
            "transfer-encoding-x",
        ]
    )
    values = st.one_of(
        header_text,
        st.sampled_from(
            [
                f"Bearer {secret_like[:-1]}",
                f"Bearer {secret_like.upper()}",
                f"bearer  {secret_like}x",
                f"Basic {base64.b64encode(secret_like.encode()).decode()}",
                "Bearer",
                "Bearer ",
                "eyJhbGciOiJub25lIn0.eyJpc3MiOiJVcHN0YXNoIn0.",
                "x" * 8000,
            ]
        ),
    )
    # As bytes (latin-1 travels as is), trimmed: an HTTP client cannot send edge whitespace.
    return st.lists(st.tuples(names, values.map(lambda v: v.encode("latin-1").strip())), max_size=6)


@given(
    path=st.sampled_from(
        [
            *PATHS.values(),
            "/",
            "/api",
            "/api/jobs/call-form/",
            "/api/jobs/../cron/check-forms",
            "/API/JOBS/CALL-FORM",
            "/api/jobs/call-form%00",
            "/api/setup-qstash?secret=",
        ]
    ),
    method=st.sampled_from(METHODS),
    body=raw_bodies,
    data=st.data(),
)
@hostile(0.25)
def test_raw_requests_without_credentials_never_get_through(target, path, method, body, data):
    headers = data.draw(junk_headers(target.keys.cron_secret), label="headers")
    query = data.draw(
        st.one_of(
            st.none(),
            st.dictionaries(
                st.sampled_from(["secret", "qstash_token", "formId", "x"]), header_text, max_size=3
            ),
        ),
        label="query",
    )
    answer = target.http.request(
        method, path, content=body if method != "GET" else None, headers=headers, params=query
    )
    # 2xx would be a way in; 404 is an unknown path, 307 Starlette dropping a trailing slash,
    # 400/431 uvicorn refusing a header.
    target.check(
        "raw requests, no credentials", answer, allowed={307, 400, 401, 404, 405, 413, 431}
    )


@given(body=raw_bodies, form_id=form_ids, extra=json_values, shape=st.integers(0, 3))
@hostile(0.12)
def test_signed_garbage_to_call_form_is_refused_without_harm(target, body, form_id, extra, shape):
    # QStash itself delivering something odd: the signature is valid, the body is not ours.
    if shape == 1:
        body = json.dumps({"formId": form_id}).encode()
    elif shape == 2:
        body = json.dumps({"formId": form_id, "extra": extra}).encode()
    # A well-formed id of no form is a 489 (unknown form): never a call, never a write.
    path = PATHS["call_form"]
    answer = target.http.post(path, content=body, headers=target.signed(path, body))
    target.check("signed garbage to call-form", answer, allowed={400, 413, 489})


@given(
    body=raw_bodies,
    extra=json_values,
    form_id=form_ids,
    kind=st.sampled_from(
        ["status-update", "end-of-call-report", "conversation-update", "tool-calls"]
    ),
)
@hostile(0.12)
def test_authenticated_garbage_to_call_events_is_refused_without_harm(
    target, body, extra, form_id, kind
):
    # Vapi itself (the secret is right) sending something odd, or about a call not ours.
    if extra is not None and not isinstance(extra, bool) and len(json.dumps(extra)) % 2:
        body = json.dumps(
            {
                "message": {
                    "type": kind,
                    "endedReason": extra,
                    "call": {
                        "id": str(extra)[:40],
                        "assistantOverrides": {"metadata": {"formIds": [form_id]}},
                    },
                    "analysis": {"structuredData": {"optOut": True}},
                }
            }
        ).encode()
    path = PATHS["call_events"]
    answer = target.http.post(
        path,
        content=body,
        headers={"content-type": "application/json", "x-vapi-secret": VAPI_WEBHOOK_SECRET},
    )
    target.check("authenticated garbage to call-events", answer, allowed={200, 400, 413})
    if answer.status_code == 200:
        assert answer.json()["status"] == "ignored"


def failure_payloads() -> st.SearchStrategy[bytes]:
    source = st.one_of(
        form_ids.map(lambda f: json.dumps({"formId": f}).encode()),
        st.binary(max_size=200),
        st.integers(1, 5000).map(lambda d: b"[" * d + b"]" * d),
        json_values.map(lambda v: json.dumps(v).encode()),
    )
    fields = st.fixed_dictionaries(
        {},
        optional={
            "status": json_values,
            "retried": json_values,
            "maxRetries": json_values,
            "sourceMessageId": st.one_of(st.text(max_size=80), json_values),
            "dlqId": st.one_of(st.text(max_size=40), json_values),
            "body": st.one_of(
                st.binary(max_size=200).map(lambda b: base64.b64encode(b).decode()),
                json_values,
                json_values.map(
                    lambda v: base64.b64encode(json.dumps({"error": v}).encode()).decode()
                ),
            ),
            "sourceBody": st.one_of(
                source.map(lambda b: base64.b64encode(b).decode()),
                json_values,
                st.text(max_size=40),
            ),
            "header": json_values,
            "url": json_values,
        },
    )
    return st.one_of(fields.map(lambda d: json.dumps(d).encode()), raw_bodies)


@given(body=failure_payloads())
@hostile(0.15)
def test_signed_garbage_to_failure_callback_is_refused_without_harm(target, body):
    path = PATHS["failure_callback"]
    answer = target.http.post(path, content=body, headers=target.signed(path, body))
    if answer.status_code == 200:  # a well-formed callback for a form that does not exist
        assert answer.json()["callStatus"] == "not_found"
    target.check("signed garbage to failure-callback", answer, allowed={200, 400, 413})


def webhook_payloads() -> st.SearchStrategy[bytes]:
    rows = st.fixed_dictionaries(
        {},
        optional={
            "id": form_ids,
            "deadline": st.one_of(json_values, st.datetimes().map(str)),
            "submitted_at": json_values,
            "qstash_message_id": st.one_of(
                json_values,
                st.sampled_from(
                    [
                        "../schedules/formcall-check-forms",
                        "..",
                        "a/b?c=d#e",
                        "msg_\u0000",
                        "%2e%2e/schedules/formcall-check-forms",
                        " msg_x",
                        "msg_ok",
                    ]
                ),
            ),
        },
    )
    payload = st.fixed_dictionaries(
        {
            "type": st.one_of(st.sampled_from(["INSERT", "UPDATE", "DELETE"]), json_values),
            "table": st.one_of(st.just("forms"), json_values),
        },
        optional={
            "schema": json_values,
            "record": st.one_of(rows, json_values),
            "old_record": st.one_of(rows, json_values),
        },
    )
    return st.one_of(payload.map(lambda d: json.dumps(d).encode()), raw_bodies)


@given(body=webhook_payloads())
@hostile(0.15)
def test_webhook_garbage_with_the_secret_changes_nothing(target, body):
    # The trigger (or whoever holds WEBHOOK_SECRET) signing odd rows: only forms that exist are
    # ever scheduled, and no id in the payload steers a QStash request.
    headers = webhook_headers(body, secret=WEBHOOK_SECRET)
    answer = target.http.post(PATHS["schedule_form"], content=body, headers=headers)
    if answer.status_code == 200:
        assert answer.json()["status"] in ("gone", "unchanged", "cancelled"), answer.text
    target.check("webhook garbage with the secret", answer, allowed={200, 400, 413}, qstash=True)


def near_misses(secret: str) -> st.SearchStrategy[str]:
    return st.one_of(
        st.just(secret[:-1]),
        st.just(secret + " x"),
        st.just(secret.upper()),
        st.just(secret.swapcase()),
        st.just(secret[1:]),
        st.just(secret * 2),
        st.just(" " + secret[:-1]),
        st.just(secret.replace(secret[0], "\u00e9", 1)),
        st.integers(0, len(secret) - 1).flatmap(
            lambda i: (
                st.characters(min_codepoint=0x21, max_codepoint=0xFF)
                .filter(lambda c: c != secret[i])
                .map(lambda c: secret[:i] + c + secret[i + 1 :])
            )
        ),
        header_text,
    )


@given(
    data=st.data(),
    where=st.sampled_from(
        [
            "check_forms",
            "setup-bearer",
            "setup-query",
            "schedule_form-bearer",
            "schedule_form-header",
        ]
    ),
)
@hostile(0.1)
def test_near_misses_of_the_secrets_never_authenticate(target, data, where):
    secret = WEBHOOK_SECRET if where.startswith("schedule_form") else target.keys.cron_secret
    guess = data.draw(near_misses(secret), label="guess")
    sent = guess.encode("latin-1").strip()  # what a header can carry
    assume(sent != secret.encode() and guess != secret)
    bearer = {"authorization": (b"Bearer " + sent).strip()}
    if where == "check_forms":
        answer = target.http.get(PATHS["check_forms"], headers=bearer)
    elif where == "setup-bearer":
        answer = target.http.get(PATHS["setup"], headers=bearer)
    elif where == "setup-query":
        answer = target.http.get(PATHS["setup"], params={"secret": guess})
    else:
        body = json.dumps(
            {"type": "INSERT", "table": "forms", "record": {"id": str(uuid.uuid4())}}
        ).encode()
        # A near miss as a bearer, or as the key of an otherwise perfect signature.
        headers = (
            [("authorization", bearer["authorization"])]
            if where.endswith("bearer")
            else list(webhook_headers(body, secret=guess).items())
        )
        answer = target.http.post(PATHS["schedule_form"], content=body, headers=headers)
    target.check("near misses of the secrets", answer, allowed={401})


@given(path=st.sampled_from(list(PATHS.values())), method=st.sampled_from(METHODS))
@hostile(0.02)
def test_other_methods_get_405_with_allow(target, path, method):
    allowed = {"check_forms": {"GET", "POST", "HEAD"}, "setup": {"GET", "HEAD"}}.get(
        next(k for k, v in PATHS.items() if v == path), {"POST"}
    )
    answer = target.http.request(method, path)
    if method in allowed:
        target.check("other methods", answer, allowed={401, 405} if method == "POST" else {401})
        return
    target.check("other methods", answer, allowed={405})
    assert set(answer.headers["allow"].replace(" ", "").split(",")) == allowed


# ---- the defects these cases found, one test each ---------------------------------------------


def test_failure_callback_with_a_foreign_source_body_is_400_not_500(target):
    # Was 500 (psycopg DataError): a signed callback whose source body's formId is no UUID.
    for source in (b'{"formId": "abc"}', b"[" * 5000 + b"]" * 5000, b'{"formId": 7}'):
        body = json.dumps({"sourceBody": base64.b64encode(source).decode()}).encode()
        path = PATHS["failure_callback"]
        answer = target.http.post(path, content=body, headers=target.signed(path, body))
        target.check("found: foreign source body", answer, allowed={400})


def test_failure_callback_with_nul_characters_is_recorded_not_500(target):
    # Was 500: PostgreSQL refuses NUL in text and jsonb (sourceMessageId, the last error).
    source = base64.b64encode(json.dumps({"formId": str(uuid.uuid4())}).encode()).decode()
    error = base64.b64encode(b'{"error": "bad\\u0000thing"}').decode()
    body = json.dumps(
        {
            "sourceBody": source,
            "sourceMessageId": "msg_\u0000x",
            "body": error,
            "dlqId": "\u0000",
            "status": "503\u0000",
        }
    ).encode()
    path = PATHS["failure_callback"]
    answer = target.http.post(path, content=body, headers=target.signed(path, body))
    target.check("found: NUL in the callback", answer, allowed={200})
    assert answer.json()["callStatus"] == "not_found"


def test_failure_callback_nested_too_deep_is_400_not_500(target):
    # Was 500 (RecursionError): a signed body of 30,000 nested arrays.
    body = b"[" * 30_000 + b"]" * 30_000
    path = PATHS["failure_callback"]
    answer = target.http.post(path, content=body, headers=target.signed(path, body))
    target.check("found: nested too deep", answer, allowed={400})


@pytest.mark.parametrize(
    "message_id",
    ["../schedules/formcall-check-forms", "..", "a/b?c=d#e", "msg_\u0000", {"id": "msg_x"}],
)
def test_a_deleted_forms_message_id_cannot_steer_qstash(target, message_id):
    # Was: DELETE /v2/messages/../schedules/formcall-check-forms, which deleted the hourly
    # schedule (httpx resolves the dots); a NUL was a 500 and "a/b?..." a 503.
    body = json.dumps(
        {
            "type": "DELETE",
            "table": "forms",
            "schema": "public",
            "record": None,
            "old_record": {"id": str(uuid.uuid4()), "qstash_message_id": message_id},
        }
    ).encode()
    answer = target.http.post(
        PATHS["schedule_form"], content=body, headers=webhook_headers(body, secret=WEBHOOK_SECRET)
    )
    target.check("found: message id path injection", answer, allowed={200})
    assert answer.json()["status"] == "gone"
    schedules = httpx.get(
        f"{target.qstash_url}/v2/schedules",
        headers={"Authorization": f"Bearer {target.keys.qstash_token}"},
    ).json()
    assert [s["scheduleId"] for s in schedules] == ["formcall-check-forms"]


def test_a_kept_message_id_that_is_not_qstashs_is_not_sent_to_qstash(target, pg_dsn):
    # The same through the row: a forms.qstash_message_id written by someone else.
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        patient = create_patient(conn)
        form = create_form(
            conn,
            patient_id=patient,
            silent=True,
            deadline=datetime.now(UTC) + timedelta(days=1),
            submitted_at=datetime.now(UTC),
        )
        conn.execute(
            "update forms set qstash_message_id = '../schedules/formcall-check-forms'"
            " where id = %s",
            (form,),
        )
        try:
            target.baseline = target.fingerprint()
            body = json.dumps(
                {
                    "type": "UPDATE",
                    "table": "forms",
                    "record": {"id": form, "submitted_at": "now"},
                    "old_record": {"id": form},
                }
            ).encode()
            answer = target.http.post(
                PATHS["schedule_form"],
                content=body,
                headers=webhook_headers(body, secret=WEBHOOK_SECRET),
            )
            assert (answer.status_code, answer.json()["status"]) == (200, "cancelled")
            schedules = httpx.get(
                f"{target.qstash_url}/v2/schedules",
                headers={"Authorization": f"Bearer {target.keys.qstash_token}"},
            ).json()
            assert [s["scheduleId"] for s in schedules] == ["formcall-check-forms"]
            assert conn.execute(
                "select qstash_message_id from forms where id = %s", (form,)
            ).fetchone() == (None,)
        finally:
            conn.execute("delete from forms where id = %s", (form,))
            conn.execute("delete from patients where id = %s", (patient,))
            target.baseline = target.fingerprint()
