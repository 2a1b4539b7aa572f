"""The fake Vapi plays calls: server messages to a real receiver on loopback, checked against Vapi's spec."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import uuid

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from formcall_dev.polling import wait_until
from formcall_dev.servers import free_port, serve_in_thread
from formcall_dev.vapi import spec as vapi_spec
from formcall_dev.vapi.fake import END_OUTCOMES, CallAlreadyEnded, FakeVapi

KEY = "test-private-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
WEBHOOK_SECRET = "x-vapi-secret-for-tests"
HMAC_SECRET = "hmac-secret-for-tests-0123456789"
SCHEMAS = {
    "status-update": "ServerMessageStatusUpdate",
    "end-of-call-report": "ServerMessageEndOfCallReport",
}
# The fields a GET and the messages must agree on.
STATE = ("status", "endedReason", "startedAt", "endedAt", "cost", "analysis")


class Receiver:
    """A call-events endpoint that records every delivery and answers a scripted status."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.received: list[dict] = []
        self.answers: list[int] = []
        self.app = Starlette(routes=[Route("/events", self.events, methods=["POST"])])

    async def events(self, request: Request) -> JSONResponse:
        raw = await request.body()
        with self.lock:
            self.received.append(
                {"raw": raw, "headers": dict(request.headers), "body": json.loads(raw)}
            )
            status = self.answers.pop(0) if self.answers else 200
        return JSONResponse({"status": "recorded"}, status_code=status)

    def messages(self, call_id: str | None = None) -> list[dict]:
        with self.lock:
            return [
                r["body"]["message"]
                for r in self.received
                if call_id is None or r["body"]["message"]["call"]["id"] == call_id
            ]

    def reset(self) -> None:
        with self.lock:
            self.received.clear()
            self.answers.clear()


@pytest.fixture(scope="module")
def served():
    fake, receiver = FakeVapi(api_key=KEY), Receiver()
    fake_server, receiver_server = serve_in_thread(fake.app), serve_in_thread(receiver.app)
    yield fake, fake_server.url, receiver, f"{receiver_server.url}/events"
    fake_server.stop()
    receiver_server.stop()


@pytest.fixture
def fake(served) -> FakeVapi:
    served[0].reset()
    served[2].reset()
    return served[0]


@pytest.fixture
def receiver(served, fake) -> Receiver:
    return served[2]


@pytest.fixture
def events_url(served) -> str:
    return served[3]


@pytest.fixture
def client(served):
    with httpx.Client(base_url=served[1], headers=AUTH, timeout=5) as client:
        yield client


def server(
    url: str,
    *,
    secret: str | None = WEBHOOK_SECRET,
    credential_id: str | None = None,
    retries: int | None = 2,
    base_delay: float = 1,
) -> dict:
    config: dict = {"url": url, "timeoutSeconds": 20}
    if retries is not None:
        config["backoffPlan"] = {
            "type": "exponential",
            "maxRetries": retries,
            "baseDelaySeconds": base_delay,
        }
    if credential_id:
        config["credentialId"] = credential_id
    elif secret:
        config["headers"] = {"X-Vapi-Secret": secret}
    return config


def call_body(
    url: str | None,
    *,
    number: str = "+15551230001",
    form_ids: tuple[str, ...] = (),
    messages: tuple[str, ...] = ("status-update", "end-of-call-report"),
    **server_options,
) -> dict:
    """A create-call body shaped as formcall sends it (issue 10)."""
    form_ids = form_ids or (str(uuid.uuid4()), str(uuid.uuid4()))
    overrides: dict = {
        "variableValues": {"formTitles": "Intake, Consent", "formCount": len(form_ids)},
        "metadata": {"formId": form_ids[0], "formIds": list(form_ids)},
    }
    if url is not None:
        overrides["server"] = server(url, **server_options)
        overrides["serverMessages"] = list(messages)
    return {
        "assistantId": "asst-1",
        "phoneNumberId": "phone-1",
        "customer": {"number": number, "name": "Pat"},
        "assistantOverrides": overrides,
    }


def place(client, body: dict) -> dict:
    response = client.post("/call", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def kinds(messages: list[dict]) -> list[str]:
    return [m["status"] if m["type"] == "status-update" else m["type"] for m in messages]


def wait_for_report(receiver: Receiver, call_id: str, count: int = 1) -> list[dict]:
    def done():
        messages = receiver.messages(call_id)
        return messages if kinds(messages).count("end-of-call-report") >= count else None

    return wait_until(done, timeout=10)


def assert_valid(message: dict) -> None:
    assert vapi_spec.validate(SCHEMAS[message["type"]], message) == []
    assert vapi_spec.validate("Call", message["call"]) == []


def test_the_create_call_body_formcall_sends_is_valid_for_vapi(events_url):
    for options in ({}, {"credential_id": "cred-1"}, {"retries": None}):
        assert vapi_spec.validate("CreateCallDTO", call_body(events_url, **options)) == []


def test_a_reached_call_reports_each_phase_in_order_valid_for_the_spec(
    fake, client, receiver, events_url
):
    fake.configure(ring_seconds=0.05, call_duration=0.1)
    body = call_body(events_url)

    created = place(client, body)
    messages = wait_for_report(receiver, created["id"])

    assert kinds(messages) == ["ringing", "in-progress", "ended", "end-of-call-report"]
    for message in messages:
        assert_valid(message)
        assert (
            message["call"]["assistantOverrides"]["metadata"]
            == body["assistantOverrides"]["metadata"]
        )
        assert message["customer"] == body["customer"]
    ringing, answered, ended, report = messages
    assert "startedAt" not in ringing["call"] and ringing["call"]["status"] == "ringing"
    assert answered["call"]["startedAt"] == answered["call"]["updatedAt"]
    assert ended["endedReason"] == report["endedReason"] == "customer-ended-call"
    assert report["startedAt"] == answered["call"]["startedAt"]
    assert report["endedAt"] == ended["call"]["endedAt"] > report["startedAt"]
    assert report["cost"] > 0 and report["analysis"]["structuredData"] == {"optOut": False}
    assert report["analysis"]["summary"] and report["artifact"]["transcript"]
    assert report["timestamp"] >= ended["timestamp"] >= ringing["timestamp"]
    # A GET now agrees with the last messages, field for field.
    got = client.get(f"/call/{created['id']}").json()
    assert vapi_spec.validate("Call", got) == []
    assert (
        {k: got.get(k) for k in STATE}
        == {k: report["call"].get(k) for k in STATE}
        == {k: ended["call"].get(k) for k in STATE}
    )
    assert deliveries_without_the_secret(receiver) == []
    assert [(d.type, d.status, d.attempt, d.answer) for d in fake.reports(created["id"])] == [
        ("status-update", "ringing", 1, 200),
        ("status-update", "in-progress", 1, 200),
        ("status-update", "ended", 1, 200),
        ("end-of-call-report", None, 1, 200),
    ]


def deliveries_without_the_secret(receiver: Receiver) -> list:
    """Deliveries that lacked the X-Vapi-Secret header or carried a signature (none expected)."""
    with receiver.lock:
        return [
            r
            for r in receiver.received
            if r["headers"].get("x-vapi-secret") != WEBHOOK_SECRET or "x-signature" in r["headers"]
        ]


def test_the_create_answer_and_every_get_are_valid_calls(fake, client, events_url):
    fake.configure(hold=True)

    created = place(client, call_body(events_url))
    ringing = client.get(f"/call/{created['id']}").json()
    fake.end_call(created["id"], "voicemail")
    ended = client.get(f"/call/{created['id']}").json()
    listed = client.get("/call").json()

    answer = {k: v for k, v in created.items() if k != "subscriptionLimits"}
    for call in (answer, ringing, ended, *listed):
        assert vapi_spec.validate("Call", call) == []
    assert (ringing["status"], ended["status"], ended["endedReason"]) == (
        "ringing",
        "ended",
        "voicemail",
    )


def test_hmac_credential_signs_every_delivery(fake, client, receiver, events_url):
    fake.configure(credentials={"cred-1": HMAC_SECRET})

    created = place(client, call_body(events_url, credential_id="cred-1"))
    wait_for_report(receiver, created["id"])

    with receiver.lock:  # this call's (an earlier test's call may still be reporting)
        deliveries = [d for d in receiver.received if created["id"].encode() in d["raw"]]
    assert len(deliveries) == 4
    for delivery in deliveries:
        timestamp = delivery["headers"]["x-timestamp"]
        expected = hmac.new(
            HMAC_SECRET.encode(), f"{timestamp}.".encode() + delivery["raw"], hashlib.sha256
        ).hexdigest()
        assert hmac.compare_digest(delivery["headers"]["x-signature"], expected)
        assert len(timestamp) == 13 and timestamp.isdigit()  # milliseconds since the epoch
        assert "x-vapi-secret" not in delivery["headers"]
    assert all(d.signed for d in fake.reports())


def test_an_unknown_credential_id_sends_no_signature(fake, client, receiver, events_url):
    fake.configure(credentials={"cred-1": HMAC_SECRET})

    created = place(client, call_body(events_url, credential_id="cred-unknown"))
    wait_for_report(receiver, created["id"])

    with receiver.lock:
        assert not any("x-signature" in r["headers"] for r in receiver.received)
    assert not any(d.signed for d in fake.reports())


def test_a_failed_delivery_is_retried_per_the_backoff_plan(fake, client, receiver, events_url):
    fake.configure(time_scale=0.01)
    receiver.answers[:] = [500, 500]

    created = place(client, call_body(events_url, retries=3, base_delay=2))
    messages = wait_for_report(receiver, created["id"])

    assert kinds(messages) == ["ringing"] * 3 + ["in-progress", "ended", "end-of-call-report"]
    assert [(d.status, d.attempt, d.answer) for d in fake.reports(created["id"])][:4] == [
        ("ringing", 1, 500),
        ("ringing", 2, 500),
        ("ringing", 3, 200),
        ("in-progress", 1, 200),
    ]
    assert fake.stats()["reports_failed"] == 2


def test_without_a_backoff_plan_a_failed_delivery_is_not_retried(
    fake, client, receiver, events_url
):
    receiver.answers[:] = [503]

    created = place(client, call_body(events_url, retries=None))
    messages = wait_for_report(receiver, created["id"])

    assert kinds(messages) == ["ringing", "in-progress", "ended", "end-of-call-report"]
    assert [(d.status, d.attempt, d.answer) for d in fake.reports(created["id"])] == [
        ("ringing", 1, 503),
        ("in-progress", 1, 200),
        ("ended", 1, 200),
        (None, 1, 200),
    ]


def test_an_unreachable_server_is_retried_then_given_up(fake, client):
    fake.configure(time_scale=0.01)
    closed = f"http://127.0.0.1:{free_port()}/events"

    created = place(client, call_body(closed, retries=1, base_delay=1))
    reports = wait_until(
        lambda: (
            [
                d
                for d in fake.reports(created["id"])
                if d.type == "end-of-call-report" and d.attempt == 2
            ]
            and fake.reports(created["id"])
        )
    )

    assert [(d.type, d.attempt, d.answer, d.error) for d in reports][-2:] == [
        ("end-of-call-report", 1, None, "ConnectError"),
        ("end-of-call-report", 2, None, "ConnectError"),
    ]
    assert len(reports) == 8  # four messages, two attempts each


def test_only_the_listed_server_messages_are_sent(fake, client, receiver, events_url):
    created = place(client, call_body(events_url, messages=("end-of-call-report",)))
    messages = wait_for_report(receiver, created["id"])

    assert kinds(messages) == ["end-of-call-report"]


def test_a_call_without_a_server_url_sends_nothing_and_still_ends(fake, client):
    created = place(client, call_body(None))

    assert client.get(f"/call/{created['id']}").json()["endedReason"] == "customer-ended-call"
    assert fake.reports() == [] and fake.stats()["calls_playing"] == 0


@pytest.mark.parametrize(
    ("outcome", "reason", "answered"),
    [
        ("reached", "customer-ended-call", True),
        ("opt_out", "assistant-ended-call", True),
        ("voicemail", "voicemail", True),
        ("no_answer", "customer-did-not-answer", False),
        ("busy", "customer-busy", False),
        ("not_connected", "twilio-failed-to-connect-call", False),
        ("bad_number", "twilio-reported-customer-misdialed", False),
    ],
)
def test_each_scripted_outcome_ends_as_vapi_reports_it(
    fake, client, receiver, events_url, outcome, reason, answered
):
    number = "+15557770001"
    fake.configure(scripts={number: [outcome]}, ring_seconds=0.02, call_duration=0.02)

    created = place(client, call_body(events_url, number=number))
    messages = wait_for_report(receiver, created["id"])

    expected = ["ringing", "in-progress", "ended", "end-of-call-report"]
    assert kinds(messages) == (
        expected if answered else [k for k in expected if k != "in-progress"]
    )
    for message in messages:
        assert_valid(message)
    report = messages[-1]
    assert report["endedReason"] == reason
    assert ("startedAt" in report) is answered and ("startedAt" in report["call"]) is answered
    assert report["analysis"]["structuredData"] == {"optOut": outcome == "opt_out"}
    assert (report["cost"] > 0) is answered
    got = client.get(f"/call/{created['id']}").json()
    assert {k: got.get(k) for k in STATE} == {k: report["call"].get(k) for k in STATE}


def test_a_script_is_consumed_one_per_call_then_the_mix_takes_over(fake, client):
    fake.configure(scripts={"+15557770002": ["no_answer", "busy"]})

    calls = [place(client, call_body(None, number="+15557770002")) for _ in range(3)]
    other = place(client, call_body(None, number="+15557770003"))

    reasons = [client.get(f"/call/{c['id']}").json()["endedReason"] for c in (*calls, other)]
    assert reasons == [
        "customer-did-not-answer",
        "customer-busy",
        "customer-ended-call",
        "customer-ended-call",
    ]
    assert fake.stats()["scripts"] == {"+15557770002": []}


def test_the_outcome_mix_is_deterministic_for_a_seed(fake, client):
    mix = {"reached": 1, "no_answer": 1, "busy": 1, "voicemail": 1}

    def draw(seed: int) -> list[str]:
        fake.reset()
        fake.configure(outcome_mix=mix, seed=seed)
        calls = [place(client, call_body(None)) for _ in range(16)]
        return [client.get(f"/call/{c['id']}").json()["endedReason"] for c in calls]

    first, again, other = draw(42), draw(42), draw(43)

    assert first == again
    assert first != other
    assert len(set(first)) > 1
    assert set(first) <= {
        "customer-ended-call",
        "customer-did-not-answer",
        "customer-busy",
        "voicemail",
    }


def test_a_held_call_rings_until_the_patient_is_played(fake, client, receiver, events_url):
    fake.configure(hold=True)

    created = place(client, call_body(events_url))
    [ringing] = wait_until(lambda: receiver.messages(created["id"]))
    got = client.get(f"/call/{created['id']}").json()
    listed = client.get("/_fake/calls").json()

    assert got == ringing["call"]  # the same state, field for field, while it rings
    assert got["status"] == "ringing" and "startedAt" not in got
    assert [(c["id"], c["status"], c["customer"]["number"]) for c in listed] == [
        (created["id"], "ringing", "+15551230001")
    ]
    assert fake.lines_in_use() == 1

    ended = client.post(f"/_fake/calls/{created['id']}/end", json={"outcome": "reached"})
    messages = wait_for_report(receiver, created["id"])

    assert ended.status_code == 200 and ended.json()["endedReason"] == "customer-ended-call"
    assert kinds(messages) == ["ringing", "in-progress", "ended", "end-of-call-report"]
    got = client.get(f"/call/{created['id']}").json()
    assert got == messages[-1]["call"] == messages[-2]["call"] == ended.json()
    assert got["startedAt"] == got["endedAt"]
    assert fake.lines_in_use() == 0
    again = client.post(f"/_fake/calls/{created['id']}/end", json={"outcome": "busy"})
    assert (again.status_code, again.json()["statusCode"]) == (409, 409)


def test_end_call_errors(fake, client, events_url):
    fake.configure(hold=True)
    created = place(client, call_body(None))

    unknown = client.post(f"/_fake/calls/{uuid.uuid4()}/end", json={"outcome": "reached"})
    bad = [
        client.post(f"/_fake/calls/{created['id']}/end", json=payload)
        for payload in ({"outcome": "hold"}, {"outcome": "maybe"}, {}, ["reached"])
    ]
    not_json = client.post(
        f"/_fake/calls/{created['id']}/end",
        content=b"{",
        headers={"content-type": "application/json"},
    )
    unauthorized = httpx.post(
        f"{client.base_url}/_fake/calls/{created['id']}/end", json={"outcome": "reached"}
    )

    assert unknown.status_code == 404
    assert [r.status_code for r in (*bad, not_json)] == [400] * 5
    assert unauthorized.status_code == 401
    assert client.get(f"/call/{created['id']}").json()["status"] == "ringing"  # nothing changed
    with pytest.raises(KeyError):
        fake.end_call(str(uuid.uuid4()), "reached")
    with pytest.raises(ValueError):
        fake.end_call(created["id"], "hold")
    fake.end_call(created["id"], "no_answer")
    with pytest.raises(CallAlreadyEnded):
        fake.end_call(created["id"], "reached")
    assert set(END_OUTCOMES) == {
        "reached",
        "voicemail",
        "no_answer",
        "busy",
        "not_connected",
        "bad_number",
        "opt_out",
    }


def test_ending_a_ringing_call_unanswered_sends_no_in_progress(fake, client, receiver, events_url):
    fake.configure(hold=True)
    created = place(client, call_body(events_url))
    wait_until(lambda: receiver.messages(created["id"]))

    fake.end_call(created["id"], "no_answer")
    messages = wait_for_report(receiver, created["id"])

    assert kinds(messages) == ["ringing", "ended", "end-of-call-report"]
    assert messages[-1]["endedReason"] == "customer-did-not-answer"
    assert "startedAt" not in client.get(f"/call/{created['id']}").json()


def test_dropped_reports_are_not_sent_but_recorded(fake, client, receiver, events_url):
    fake.configure(report_drop_rate=1)

    created = place(client, call_body(events_url))
    reports = wait_until(
        lambda: len(fake.reports(created["id"])) == 4 and fake.reports(created["id"])
    )

    assert all(d.dropped and d.answer is None for d in reports)
    assert receiver.messages() == []
    assert client.get(f"/call/{created['id']}").json()["status"] == "ended"
    assert fake.stats()["reports_dropped"] == 4


def test_duplicated_reports_are_sent_twice(fake, client, receiver, events_url):
    fake.configure(report_duplicate_rate=1)

    created = place(client, call_body(events_url))
    messages = wait_for_report(receiver, created["id"], count=2)

    assert kinds(messages) == [
        "ringing",
        "ringing",
        "in-progress",
        "in-progress",
        "ended",
        "ended",
        "end-of-call-report",
        "end-of-call-report",
    ]
    assert messages[0] == messages[1] and messages[-1] == messages[-2]
    assert [d.duplicate for d in fake.reports(created["id"])] == [False, True] * 4


def test_reorder_sends_the_final_status_after_the_report(fake, client, receiver, events_url):
    fake.configure(reorder=True)

    created = place(client, call_body(events_url))
    wait_until(lambda: len(receiver.messages(created["id"])) == 4)

    assert kinds(receiver.messages(created["id"])) == [
        "ringing",
        "in-progress",
        "end-of-call-report",
        "ended",
    ]


def test_blocked_calls_send_no_reports(fake, client, receiver, events_url):
    fake.configure(concurrency_limit=1, hold=True)
    first = place(client, call_body(events_url))
    wait_until(lambda: receiver.messages(first["id"]))

    blocked = place(client, call_body(events_url))
    fake.end_call(first["id"], "reached")
    wait_for_report(receiver, first["id"])

    assert blocked["subscriptionLimits"]["concurrencyBlocked"] is True
    assert receiver.messages(blocked["id"]) == [] and fake.reports(blocked["id"]) == []
    assert {m["call"]["id"] for m in receiver.messages()} == {first["id"]}
    with pytest.raises(CallAlreadyEnded):
        fake.end_call(blocked["id"], "reached")


def test_a_place_rule_creates_the_call_then_answers_5xx(fake, client, receiver, events_url):
    body = call_body(events_url)
    form_id = body["assistantOverrides"]["metadata"]["formId"]
    fake.add_rule(form_id=form_id, status=502, place=True, times=1)

    response = client.post("/call", json=body)

    assert response.status_code == 502 and response.json()["statusCode"] == 502
    [call] = fake.calls_for_form(form_id)
    assert fake.calls_for_form(body["assistantOverrides"]["metadata"]["formIds"][1]) == [call]
    assert kinds(wait_for_report(receiver, call["id"]))[-1] == "end-of-call-report"
    [record] = fake.requests
    assert (record.outcome, record.status, record.reason, record.call_id) == (
        "placed",
        502,
        "injected",
        call["id"],
    )
    assert client.post("/_fake/rules", json={"place": True, "delay": 1}).status_code == 400


def test_reset_cancels_calls_still_playing(fake, client, receiver, events_url):
    fake.configure(hold=True)
    created = place(client, call_body(events_url))
    wait_until(lambda: receiver.messages(created["id"]))
    assert fake.stats()["calls_playing"] == 1

    fake.reset()

    wait_until(lambda: fake.stats()["calls_playing"] == 0)
    assert fake.reports() == [] and fake.get_call(created["id"]) is None
    assert fake.stats()["hold"] is False


def test_invalid_server_settings_are_a_400(fake, client, events_url):
    body = call_body(events_url)
    body["assistantOverrides"]["server"]["backoffPlan"] = {"type": "linear", "maxRetries": 11}

    response = client.post("/call", json=body)

    assert response.status_code == 400
    assert response.json()["message"] == [
        "assistantOverrides.server.backoffPlan.type must be one of the following values: "
        "fixed, exponential",
        "assistantOverrides.server.backoffPlan.maxRetries must not be greater than 10",
        "assistantOverrides.server.backoffPlan.baseDelaySeconds should not be empty",
    ]
    assert fake.placed_calls() == []


def test_admin_http_api_for_calls_and_reports(fake, client, receiver, events_url):
    configured = client.post(
        "/_fake/configure",
        json={
            "ring_seconds": 0.01,
            "time_scale": 0.5,
            "outcome_mix": {"voicemail": 1},
            "seed": 7,
            "credentials": {"cred-1": HMAC_SECRET},
            "report_drop_rate": 0,
            "report_duplicate_rate": 0,
            "reorder": False,
            "hold": False,
            "scripts": {"+15557770009": ["busy"]},
        },
    )
    bad = [
        client.post("/_fake/configure", json=settings)
        for settings in (
            {"outcome_mix": {"maybe": 1}},
            {"outcome_mix": {"reached": 0}},
            {"report_drop_rate": 2},
            {"scripts": {"+1555": ["later"]}},
            {"credentials": {"c": 1}},
            {"hold": "yes"},
            {"seed": 1.5},
            {"colour": "blue"},
        )
    ]

    created = place(client, call_body(events_url, credential_id="cred-1"))
    wait_for_report(receiver, created["id"])
    reports = client.get("/_fake/reports", params={"callId": created["id"]}).json()
    everything = client.get("/_fake/reports").json()
    none = client.get("/_fake/reports", params={"callId": str(uuid.uuid4())}).json()

    assert configured.status_code == 200
    stats = configured.json()
    assert (stats["outcome_mix"], stats["credentials"], stats["time_scale"]) == (
        {"voicemail": 1.0},
        ["cred-1"],
        0.5,
    )
    assert HMAC_SECRET not in configured.text
    assert [r.status_code for r in bad] == [400] * len(bad)
    assert [(r["type"], r["status"], r["attempt"], r["answer"], r["signed"]) for r in reports] == [
        ("status-update", "ringing", 1, 200, True),
        ("status-update", "in-progress", 1, 200, True),
        ("status-update", "ended", 1, 200, True),
        ("end-of-call-report", None, 1, 200, True),
    ]
    assert reports[-1]["ended_reason"] == "voicemail" and everything == reports and none == []
    assert httpx.get(f"{client.base_url}/_fake/reports").status_code == 401
