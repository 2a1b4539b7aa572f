"""The fake Vapi's lines: calls of varying length, both blocked behaviours, 5xx after creating, and line statistics."""

from __future__ import annotations

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
from formcall_dev.servers import serve_in_thread
from formcall_dev.vapi import spec as vapi_spec
from formcall_dev.vapi.fake import CONCURRENCY_ENDED_REASON, FakeVapi, line_series

KEY = "test-private-key-lines"
AUTH = {"Authorization": f"Bearer {KEY}"}


class Reports:
    """A call-events endpoint recording the server messages it receives."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.messages: list[dict] = []
        self.app = Starlette(routes=[Route("/events", self.events, methods=["POST"])])

    async def events(self, request: Request) -> JSONResponse:
        message = json.loads(await request.body())["message"]
        with self.lock:
            self.messages.append(message)
        return JSONResponse({"status": "recorded"})

    def of(self, call_id: str) -> list[str]:
        """The call's messages as kinds: the status of a status-update, else the type."""
        with self.lock:
            return [
                m["status"] if m["type"] == "status-update" else m["type"]
                for m in self.messages
                if m["call"]["id"] == call_id
            ]

    def ended(self) -> set[str]:
        with self.lock:
            return {m["call"]["id"] for m in self.messages if m["type"] == "end-of-call-report"}


@pytest.fixture(scope="module")
def served():
    fake, reports = FakeVapi(api_key=KEY), Reports()
    fake_server, reports_server = serve_in_thread(fake.app), serve_in_thread(reports.app)
    yield fake, fake_server.url, reports, f"{reports_server.url}/events"
    fake_server.stop()
    reports_server.stop()
    fake.close()


@pytest.fixture
def fake(served) -> FakeVapi:
    served[0].reset()
    with served[2].lock:
        served[2].messages.clear()
    return served[0]


@pytest.fixture
def reports(served, fake) -> Reports:
    return served[2]


@pytest.fixture
def client(served):
    with httpx.Client(base_url=served[1], headers=AUTH, timeout=5) as client:
        yield client


def body(
    events_url: str | None = None, *, form_id: str | None = None, number: str = "+15551230001"
) -> dict:
    form_id = form_id or str(uuid.uuid4())
    overrides: dict = {"metadata": {"formId": form_id, "formIds": [form_id]}}
    if events_url:
        overrides["server"] = {"url": events_url, "headers": {"X-Vapi-Secret": "s" * 20}}
        overrides["serverMessages"] = ["status-update", "end-of-call-report"]
    return {
        "assistantId": "asst-1",
        "phoneNumberId": "phone-1",
        "customer": {"number": number},
        "assistantOverrides": overrides,
    }


def place(client, payload: dict) -> dict:
    response = client.post("/call", json=payload)
    assert response.status_code == 201, response.text
    return response.json()


def lengths(fake: FakeVapi) -> dict[str, list[float]]:
    """Seconds each call held its line, by outcome."""
    out: dict[str, list[float]] = {}
    for call in fake.line_stats()["calls"]:
        out.setdefault(call["outcome"], []).append(call["ended"] - call["started"])
    return out


def test_durations_are_drawn_per_outcome_and_scaled(fake, client):
    fake.configure(
        concurrency_limit=200,
        time_scale=0.001,
        seed=7,
        outcome_mix={"no_answer": 1, "voicemail": 1, "reached": 2},
        durations={
            "no_answer": [25, 35],
            "voicemail": [30, 60],
            "reached": {"lognormal_median": 90, "max": 100, "min": 80},
        },
    )
    for _ in range(60):
        place(client, body())

    drawn = lengths(fake)

    assert set(drawn) == {"no_answer", "voicemail", "reached"}
    assert all(0.025 - 1e-6 <= s <= 0.035 + 1e-6 for s in drawn["no_answer"])
    assert all(0.030 - 1e-6 <= s <= 0.060 + 1e-6 for s in drawn["voicemail"])
    assert all(0.080 - 1e-6 <= s <= 0.100 + 1e-6 for s in drawn["reached"])
    # A lognormal of median 90 s and sigma 0.6 leaves its [80, 100] band often: both bounds hit.
    assert {round(s, 6) for s in drawn["reached"]} >= {0.08, 0.1}
    assert len({round(s, 9) for s in drawn["no_answer"]}) == len(drawn["no_answer"])

    # The same seed draws the same lengths in the same order.
    first = [c["ended"] - c["started"] for c in fake.line_stats()["calls"]]
    fake.reset()
    fake.configure(
        concurrency_limit=200,
        time_scale=0.001,
        seed=7,
        outcome_mix={"no_answer": 1, "voicemail": 1, "reached": 2},
        durations={
            "no_answer": [25, 35],
            "voicemail": [30, 60],
            "reached": {"lognormal_median": 90, "max": 100, "min": 80},
        },
    )
    for _ in range(60):
        place(client, body())
    again = [c["ended"] - c["started"] for c in fake.line_stats()["calls"]]
    assert again == pytest.approx(first, abs=1e-5)


def test_a_call_plays_its_drawn_length_and_answers_after_the_ring(fake, client, reports, served):
    fake.configure(
        ring_seconds=0.1,
        durations={"reached": 0.4, "no_answer": 0.2},
        scripts={"+15551230009": ["no_answer"]},
    )
    events_url = served[3]
    reached = place(client, body(events_url))
    unanswered = place(client, body(events_url, number="+15551230009"))

    wait_until(lambda: reports.ended() >= {reached["id"], unanswered["id"]}, timeout=10)

    assert reports.of(reached["id"]) == ["ringing", "in-progress", "ended", "end-of-call-report"]
    assert reports.of(unanswered["id"]) == ["ringing", "ended", "end-of-call-report"]
    calls = {c["id"]: c for c in fake.line_stats()["calls"]}
    talk, ring = calls[reached["id"]], calls[unanswered["id"]]
    assert talk["ended"] - talk["started"] == pytest.approx(0.4, abs=1e-5)
    assert talk["answered"] - talk["started"] == pytest.approx(0.1, abs=1e-5)
    assert ring["answered"] is None
    assert ring["ended"] - ring["started"] == pytest.approx(0.2, abs=1e-5)
    view = fake.get_call(reached["id"])
    assert vapi_spec.validate("Call", view) == []
    assert view["endedReason"] == "customer-ended-call"


@pytest.mark.parametrize(
    "durations",
    [
        {"reached": -1},
        {"reached": [5, 1]},
        {"reached": [1]},
        {"reached": {"median": 3}},
        {"reached": {"lognormal_median": 0}},
        {"reached": {"lognormal_median": 9, "min": 5, "max": 4}},
        {"hold": 3},
        {"reached": True},
        ["reached"],
    ],
)
def test_bad_durations_are_a_400(fake, client, durations):
    response = client.post("/_fake/configure", json={"durations": durations})
    assert response.status_code == 400
    assert "durations must map outcomes" in response.json()["message"][0]
    assert fake.stats()["durations"] == {}


def test_bad_blocked_behaviour_is_a_400(fake, client):
    response = client.post("/_fake/configure", json={"blocked_behaviour": "wait"})
    assert response.status_code == 400 and "blocked_behaviour" in response.json()["message"][0]
    assert fake.stats()["blocked_behaviour"] == "end"


def test_blocked_end_ends_the_call_at_once(fake, client):
    fake.configure(concurrency_limit=1, hold=True)
    first = place(client, body())

    blocked = place(client, body())

    assert blocked["subscriptionLimits"]["concurrencyBlocked"] is True
    assert blocked["status"] == "ended" and blocked["endedReason"] == CONCURRENCY_ENDED_REASON
    assert client.get(f"/call/{blocked['id']}").json()["endedReason"] == CONCURRENCY_ENDED_REASON
    fake.end_call(first["id"], "reached")
    assert client.get(f"/call/{blocked['id']}").json()["status"] == "ended"
    lines = fake.line_stats()
    assert (lines["refused"], lines["queued"], lines["max_in_use"]) == (1, 0, 1)
    assert [r.outcome for r in fake.requests] == ["placed", "blocked"]


def test_blocked_queue_starts_waiting_calls_first_come_first_served(fake, client, reports, served):
    events_url = served[3]
    fake.configure(concurrency_limit=1, hold=True, blocked_behaviour="queue")
    first = place(client, body(events_url))
    second = place(client, body(events_url))
    third = place(client, body(events_url))

    for queued in (second, third):
        assert queued["status"] == "queued"
        assert queued["subscriptionLimits"] == {
            "concurrencyBlocked": True,
            "concurrencyLimit": 1,
            "remainingConcurrentCalls": 0,
        }
        assert (
            vapi_spec.validate(
                "Call", {k: v for k, v in queued.items() if k != "subscriptionLimits"}
            )
            == []
        )
    assert client.get(f"/call/{second['id']}").json()["status"] == "queued"
    assert [c["status"] for c in client.get("/call").json()] == ["queued", "queued", "ringing"]
    assert [r.outcome for r in fake.requests] == ["placed", "queued", "queued"]
    wait_until(lambda: reports.of(first["id"]) == ["ringing"])
    assert reports.of(second["id"]) == [] == reports.of(third["id"])

    fake.end_call(first["id"], "no_answer")

    wait_until(lambda: reports.of(second["id"]) == ["ringing"])
    assert client.get(f"/call/{second['id']}").json()["status"] == "ringing"
    assert client.get(f"/call/{third['id']}").json()["status"] == "queued"
    fake.end_call(second["id"], "reached")
    wait_until(lambda: reports.of(third["id"]) == ["ringing"])
    fake.end_call(third["id"], "reached")
    wait_until(lambda: reports.ended() == {first["id"], second["id"], third["id"]})

    lines = fake.line_stats()
    calls = {c["id"]: c for c in lines["calls"]}
    assert calls[second["id"]]["started"] == calls[first["id"]]["ended"]
    assert calls[third["id"]]["started"] == calls[second["id"]]["ended"]
    assert (lines["max_in_use"], lines["refused"], lines["queued"], lines["waiting"]) == (
        1,
        0,
        2,
        0,
    )
    assert [n for _, n in lines["series"]] == [1, 0, 1, 0, 1, 0]
    assert lines["doubles"] == 0


def test_queued_calls_start_as_lines_free_without_anyone_asking(fake, client, reports, served):
    # Nothing but the fake's own timers moves these calls on: the test only watches reports.
    fake.configure(concurrency_limit=2, blocked_behaviour="queue", durations={"reached": 0.3})
    calls = [place(client, body(served[3])) for _ in range(6)]

    wait_until(lambda: reports.ended() == {c["id"] for c in calls}, timeout=15)

    assert [c["status"] for c in calls] == ["queued"] * 6  # as created, before a timer moved on
    blocked = [c["subscriptionLimits"]["concurrencyBlocked"] for c in calls]
    assert blocked == [False] * 2 + [True] * 4
    lines = fake.line_stats()
    assert lines["max_in_use"] == 2 and lines["queued"] == 4 and lines["waiting"] == 0
    by_id = {c["id"]: c for c in lines["calls"]}
    starts = [by_id[c["id"]]["started"] for c in calls]
    ends = sorted(by_id[c["id"]]["ended"] for c in calls)
    # Each queued call took the line the earliest-ending call freed, in order of creation.
    assert starts[2:] == ends[:4]
    assert max(n for _, n in line_series(lines["calls"], until=ends[-1])) == 2


@pytest.mark.parametrize("status", [500, 502])
def test_created_then_answered_5xx(fake, client, reports, served, status):
    payload = body(served[3])
    form_id = payload["assistantOverrides"]["metadata"]["formId"]
    fake.configure(durations={"reached": 0.2})
    fake.add_rule(form_id=form_id, status=status, place=True)

    first = client.post("/call", json=payload)
    second = client.post("/call", json=payload)

    assert (first.status_code, second.status_code) == (status, status)
    assert first.json()["statusCode"] == status
    calls = fake.calls_for_form(form_id)
    assert len(calls) == 2  # Vapi created each: a retry after a 5xx calls the patient again
    listed = [
        c
        for c in client.get("/call").json()
        if c["assistantOverrides"]["metadata"]["formId"] == form_id
    ]
    assert {c["id"] for c in listed} == {c["id"] for c in calls}
    wait_until(lambda: reports.ended() == {c["id"] for c in calls}, timeout=10)
    lines = fake.line_stats()
    assert lines["calls_per_form"] == {form_id: 2} and lines["doubles"] == 1
    assert [(r.outcome, r.status) for r in fake.requests] == [("placed", status)] * 2


def test_line_stats_over_http_need_the_key(fake, served, client):
    fake.configure(durations={"reached": 0.05})
    created = place(client, body())
    wait_until(lambda: fake.get_call(created["id"])["status"] == "ended")

    assert httpx.get(f"{served[1]}/_fake/lines").status_code == 401
    lines = client.get("/_fake/lines").json()

    assert lines["max_in_use"] == 1 and [n for _, n in lines["series"]] == [1, 0]
    [call] = lines["calls"]
    assert call["id"] == created["id"] and call["outcome"] == "reached"
    assert call["ended"] - call["started"] == pytest.approx(0.05, abs=1e-5)
    assert client.get("/_fake/stats").json()["queued"] == 0


def test_line_series_counts_a_line_freed_and_taken_at_once_once():
    calls = [
        {"started": 0.0, "ended": 1.0},
        {"started": 1.0, "ended": 2.0},
        {"started": 0.5, "ended": None},
        {"started": None, "ended": None},
    ]
    assert line_series(calls, until=1.5) == [[0.0, 1], [0.5, 2], [1.0, 1], [1.0, 2]]
    assert max(n for _, n in line_series(calls, until=5)) == 2
