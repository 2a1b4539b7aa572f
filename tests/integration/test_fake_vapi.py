"""The fake Vapi over real HTTP on loopback: wire format, line limit, fault rules, admin API."""

from __future__ import annotations

import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from formcall_dev.servers import serve_in_thread
from formcall_dev.vapi.fake import CONCURRENCY_ENDED_REASON, INVALID_KEY_MESSAGE, FakeVapi

KEY = "test-private-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ISO_MS_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture(scope="module")
def served():
    fake = FakeVapi(api_key=KEY)
    server = serve_in_thread(fake.app)
    yield fake, server.url
    server.stop()


@pytest.fixture
def fake(served) -> FakeVapi:
    served[0].reset()
    return served[0]


@pytest.fixture
def client(served):
    with httpx.Client(base_url=served[1], headers=AUTH, timeout=5) as client:
        yield client


def call_body(
    *,
    form_id: str | None = None,
    number: str = "+15551230001",
    assistant_id: str = "asst-1",
    **extra,
) -> dict:
    body = {
        "assistantId": assistant_id,
        "phoneNumberId": "phone-1",
        "customer": {"number": number, "name": "Pat"},
        "assistantOverrides": {
            "variableValues": {"deadline": "5pm"},
            "metadata": {"formId": form_id or str(uuid.uuid4())},
        },
    }
    return body | extra


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}]
)
def test_create_call_without_the_key_is_401(fake, served, headers):
    response = httpx.post(f"{served[1]}/call", json=call_body(), headers=headers)

    assert response.status_code == 401
    assert response.json() == {
        "message": INVALID_KEY_MESSAGE,
        "error": "Unauthorized",
        "statusCode": 401,
    }
    assert fake.placed_calls() == []
    assert fake.stats()["unauthorized"] == 1


def test_create_call_answers_a_vapi_call(fake, client):
    body = call_body(form_id="form-1")

    response = client.post("/call", json=body)

    assert response.status_code == 201
    call = response.json()
    uuid.UUID(call["id"])
    assert call["orgId"] == fake.org_id
    assert ISO_MS_Z.match(call["createdAt"]) and ISO_MS_Z.match(call["updatedAt"])
    assert call["type"] == "outboundPhoneCall"
    assert call["status"] == "queued"
    assert (call["assistantId"], call["phoneNumberId"]) == ("asst-1", "phone-1")
    assert call["customer"] == body["customer"]
    assert call["assistantOverrides"] == body["assistantOverrides"]
    assert call["subscriptionLimits"] == {
        "concurrencyBlocked": False,
        "concurrencyLimit": 10,
        "remainingConcurrentCalls": 9,
    }
    [record] = fake.requests
    assert (record.outcome, record.status, record.form_id, record.call_id) == (
        "placed",
        201,
        "form-1",
        call["id"],
    )
    assert [c["id"] for c in fake.calls_for_form("form-1")] == [call["id"]]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"metadata": {"formId": "f"}}, "property metadata should not exist"),
        ({"customer": {"number": "5551230001"}}, "customer.number must be a valid phone number"),
        ({"customer": {"number": "+05551230001"}}, "customer.number must be a valid phone number"),
        (
            {"customer": {"number": "+1555123000199999"}},
            "customer.number must be a valid phone number",
        ),
        (
            {"customer": {"number": "+15551230001", "name": "x" * 41}},
            "customer.name must be shorter than or equal to 40 characters",
        ),
        (
            {"name": "form:" + str(uuid.uuid4())},
            "name must be shorter than or equal to 40 characters",
        ),
        ({"assistantId": None}, "assistantId or assistant"),
        ({"phoneNumberId": None}, "phoneNumberId or phoneNumber must be provided"),
        ({"customer": None}, "customer or customerId must be provided"),
    ],
)
def test_invalid_create_call_is_a_nestjs_400(fake, client, change, message):
    body = {k: v for k, v in (call_body() | change).items() if v is not None}

    response = client.post("/call", json=body)

    assert response.status_code == 400
    payload = response.json()
    assert payload["error"] == "Bad Request" and payload["statusCode"] == 400
    assert any(m.startswith(message) for m in payload["message"]), payload["message"]
    assert (fake.stats()["placed"], fake.stats()["rejected"]) == (0, 1)


def test_a_40_character_name_is_accepted(client):
    response = client.post("/call", json=call_body(name="f:" + "x" * 38))

    assert response.status_code == 201


def test_concurrency_limit_blocks_calls_and_frees_lines_after_the_call(fake, client):
    fake.configure(concurrency_limit=2, call_duration=0.5)

    with ThreadPoolExecutor(5) as pool:
        responses = list(pool.map(lambda _: client.post("/call", json=call_body()), range(5)))

    assert [r.status_code for r in responses] == [201] * 5
    calls = [r.json() for r in responses]
    blocked = [c for c in calls if c["subscriptionLimits"]["concurrencyBlocked"]]
    assert len(blocked) == 3
    assert all(
        c["status"] == "ended" and c["endedReason"] == CONCURRENCY_ENDED_REASON for c in blocked
    )
    assert all(c["subscriptionLimits"]["remainingConcurrentCalls"] == 0 for c in blocked)
    stats = fake.stats()
    assert (stats["placed"], stats["blocked"], stats["max_concurrent"]) == (2, 3, 2)
    assert len(fake.placed_calls()) == 2
    assert fake.lines_in_use() == 2

    time.sleep(0.55)

    assert fake.lines_in_use() == 0
    assert {c["status"] for c in fake.placed_calls()} == {"ended"}
    again = client.post("/call", json=call_body()).json()
    assert again["subscriptionLimits"]["concurrencyBlocked"] is False
    assert fake.get_call(again["id"])["status"] == "in-progress"
    assert fake.max_concurrent == 2


def test_status_rule_answers_once_without_placing_then_calls_succeed(fake, client):
    fake.add_rule(status=500, times=1)

    first = client.post("/call", json=call_body(form_id="form-1"))
    second = client.post("/call", json=call_body(form_id="form-1"))

    assert first.status_code == 500
    assert first.json() == {
        "message": "Internal Server Error",
        "error": "Internal Server Error",
        "statusCode": 500,
    }
    assert second.status_code == 201
    assert [c["id"] for c in fake.calls_for_form("form-1")] == [second.json()["id"]]
    assert [(r.outcome, r.reason) for r in fake.requests] == [
        ("rejected", "injected"),
        ("placed", None),
    ]


def test_rules_match_by_form_id_and_customer_number(fake, client):
    fake.add_rule(form_id="form-bad", status=429, headers={"Retry-After": "1"})
    fake.add_rule(customer_number="+15550000000", status=400, body={"message": ["nope"]})

    limited = client.post("/call", json=call_body(form_id="form-bad"))
    limited_again = client.post("/call", json=call_body(form_id="form-bad"))
    other = client.post("/call", json=call_body(form_id="form-good"))
    by_number = client.post("/call", json=call_body(number="+15550000000"))

    assert (limited.status_code, limited.headers["retry-after"]) == (429, "1")
    assert limited.json()["statusCode"] == 429
    assert limited_again.status_code == 429
    assert other.status_code == 201
    assert (by_number.status_code, by_number.json()) == (400, {"message": ["nope"]})
    assert fake.calls_for_form("form-bad") == []
    assert [r["hits"] for r in fake.rules()] == [2, 1]


def test_delay_rule_places_the_call_but_the_client_times_out(fake, served):
    fake.add_rule(form_id="form-slow", delay=0.4, times=1)

    with httpx.Client(
        base_url=served[1], headers=AUTH, timeout=httpx.Timeout(5, read=0.1)
    ) as client:
        with pytest.raises(httpx.ReadTimeout):
            client.post("/call", json=call_body(form_id="form-slow"))

    assert len(fake.calls_for_form("form-slow")) == 1
    [record] = fake.requests
    assert (record.outcome, record.delay, record.dropped) == ("placed", 0.4, False)


def test_drop_rule_places_the_call_and_drops_the_connection(fake, client):
    fake.add_rule(form_id="form-drop", drop=True, times=1)

    with pytest.raises(httpx.TransportError):
        client.post("/call", json=call_body(form_id="form-drop"))
    after = client.post("/call", json=call_body(form_id="form-drop"))

    assert after.status_code == 201
    assert len(fake.calls_for_form("form-drop")) == 2
    assert [(r.outcome, r.status, r.dropped) for r in fake.requests] == [
        ("placed", None, True),
        ("placed", 201, False),
    ]
    assert fake.stats()["dropped"] == 1


def test_latency_delays_every_create_call(fake, client):
    fake.configure(latency=0.2)

    started = time.monotonic()
    response = client.post("/call", json=call_body())

    assert response.status_code == 201
    assert time.monotonic() - started >= 0.2


def test_list_calls_filters_by_created_at_window_and_assistant(fake, client):
    ids = []
    for assistant_id in ("asst-a", "asst-b", "asst-a", "asst-a"):
        ids.append(client.post("/call", json=call_body(assistant_id=assistant_id)).json())
        time.sleep(0.005)
    first, second, third, fourth = ids

    everything = client.get("/call").json()
    window = client.get(
        "/call", params={"createdAtGt": first["createdAt"], "createdAtLe": third["createdAt"]}
    ).json()
    assistant_a = client.get("/call", params={"assistantId": "asst-a", "limit": 2}).json()
    since = client.get(
        "/call",
        params={
            "createdAtGe": second["createdAt"],
            "createdAtLt": fourth["createdAt"],
            "assistantId": "asst-a",
        },
    ).json()

    assert [c["id"] for c in everything] == [c["id"] for c in (fourth, third, second, first)]
    assert [c["id"] for c in window] == [third["id"], second["id"]]
    assert [c["id"] for c in assistant_a] == [fourth["id"], third["id"]]
    assert [c["id"] for c in since] == [third["id"]]
    assert client.get("/call", params={"id": second["id"]}).json()[0]["id"] == second["id"]
    assert client.get("/call", params={"limit": 1001}).status_code == 400
    assert client.get("/call", params={"createdAtGt": "yesterday"}).status_code == 400
    assert client.get("/call", params={"name": "x"}).status_code == 400
    assert httpx.get(f"{client.base_url}/call").status_code == 401


def test_list_includes_blocked_calls_as_ended(fake, client):
    fake.configure(concurrency_limit=0)

    blocked = client.post("/call", json=call_body()).json()

    [listed] = client.get("/call").json()
    assert (listed["id"], listed["status"]) == (blocked["id"], "ended")
    assert listed["endedReason"] == CONCURRENCY_ENDED_REASON
    assert fake.placed_calls() == []


def test_get_call_by_id(fake, client):
    created = client.post("/call", json=call_body()).json()

    fetched = client.get(f"/call/{created['id']}")
    missing = client.get(f"/call/{uuid.uuid4()}")

    assert fetched.status_code == 200
    assert fetched.json()["id"] == created["id"] and fetched.json()["status"] == "ended"
    assert "subscriptionLimits" not in fetched.json()
    assert (missing.status_code, missing.json()["statusCode"]) == (404, 404)
    assert client.get("/call/not-a-uuid").status_code == 400
    assert httpx.get(f"{client.base_url}/call/{created['id']}").status_code == 401


def test_admin_http_api(fake, client):
    assert httpx.get(f"{client.base_url}/_fake/stats").status_code == 401

    configured = client.post(
        "/_fake/configure", json={"concurrency_limit": 1, "call_duration": 5}
    ).json()
    rule = client.post("/_fake/rules", json={"form_id": "form-x", "status": 503, "times": 1})
    bad_rule = client.post("/_fake/rules", json={"form_id": "form-x", "action": "explode"})
    bad_config = client.post("/_fake/configure", json={"concurrency_limit": -1})
    failed = client.post("/call", json=call_body(form_id="form-x"))
    placed = client.post("/call", json=call_body(form_id="form-x"))
    blocked = client.post("/call", json=call_body(form_id="form-y"))

    assert (configured["concurrency_limit"], configured["call_duration"]) == (1, 5.0)
    assert rule.status_code == 201 and rule.json()["times"] == 1
    assert bad_rule.status_code == 400 and bad_config.status_code == 400
    assert (failed.status_code, placed.status_code, blocked.status_code) == (503, 201, 201)
    assert [r["hits"] for r in client.get("/_fake/rules").json()] == [1]
    requests = client.get("/_fake/requests").json()
    assert [(r["outcome"], r["form_id"]) for r in requests] == [
        ("rejected", "form-x"),
        ("placed", "form-x"),
        ("blocked", "form-y"),
    ]
    assert [
        r["outcome"] for r in client.get("/_fake/requests", params={"formId": "form-y"}).json()
    ] == ["blocked"]
    assert [c["id"] for c in client.get("/_fake/calls", params={"formId": "form-x"}).json()] == [
        placed.json()["id"]
    ]
    stats = client.get("/_fake/stats").json()
    assert {
        k: stats[k]
        for k in (
            "requests",
            "placed",
            "blocked",
            "rejected",
            "injected",
            "max_concurrent",
            "lines_in_use",
        )
    } == {
        "requests": 3,
        "placed": 1,
        "blocked": 1,
        "rejected": 1,
        "injected": 1,
        "max_concurrent": 1,
        "lines_in_use": 1,
    }

    assert client.delete("/_fake/rules").json() == []
    reset = client.post("/_fake/reset").json()

    assert (reset["requests"], reset["concurrency_limit"], reset["rules"]) == (0, 10, 0)
    assert fake.requests == [] and fake.max_concurrent == 0
