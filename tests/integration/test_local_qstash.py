"""The local QStash driven by the official `qstash` client: loopback HTTP, real PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import inspect
import json
import secrets
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from datetime import datetime
from zoneinfo import ZoneInfo

import httpx
import jwt
import psycopg
import pytest
from qstash import QStash, Receiver
from qstash.errors import QStashError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from formcall_dev.qstash.server import create_app, generate_dev_credentials
from formcall_dev.servers import serve_in_thread

# QStash's first retry waits e^2.5 = 12 s; scaled, it is 12 ms (the second 148 ms, the third 1.8 s).
TIME_SCALE = 0.001


@dataclass
class Delivery:
    path: str
    query: str
    method: str
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def json(self):
        return json.loads(self.body)


class Destination:
    """A destination that records every request; a test sets per-path behaviour (status, delay)."""

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []
        self.behaviours: dict[str, object] = {}
        self.in_flight: collections.Counter[str] = collections.Counter()
        self.max_in_flight: collections.Counter[str] = collections.Counter()
        self.changed = threading.Condition()
        self.base = ""
        self.app = Starlette(
            routes=[
                Route(
                    "/{path:path}", self.handle, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]
                )
            ]
        )

    def url(self, path: str) -> str:
        return f"{self.base}/{path}"

    async def handle(self, request: Request) -> Response:
        path = request.path_params["path"]
        delivery = Delivery(
            path=path,
            query=request.url.query,
            method=request.method,
            headers=dict(request.headers),
            body=await request.body(),
            at=time.time(),
        )
        with self.changed:
            index = sum(1 for d in self.deliveries if d.path == path)
            self.deliveries.append(delivery)
            self.in_flight[path] += 1
            self.max_in_flight[path] = max(self.max_in_flight[path], self.in_flight[path])
            self.changed.notify_all()
        try:
            behaviour = self.behaviours.get(path)
            result = behaviour(index) if behaviour else PlainTextResponse("ok")
            if inspect.isawaitable(result):
                result = await result
            return result
        finally:
            with self.changed:
                self.in_flight[path] -= 1

    def at(self, path: str) -> list[Delivery]:
        with self.changed:
            return [d for d in self.deliveries if d.path == path]

    def wait_for(self, path: str, count: int, timeout: float = 10) -> list[Delivery]:
        deadline = time.monotonic() + timeout
        with self.changed:
            while len(got := [d for d in self.deliveries if d.path == path]) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{path}: expected {count} deliveries, got {len(got)}")
                self.changed.wait(left)
            return got


@dataclass
class LocalServer:
    """One local QStash on a schema of its own; stop() and start() again to test a restart."""

    dsn: str
    schema: str = field(default_factory=lambda: "lq_" + secrets.token_hex(5))
    credentials: dict = field(default_factory=generate_dev_credentials)
    handle: object = None

    @property
    def token(self) -> str:
        return self.credentials["QSTASH_TOKEN"]

    @property
    def current_key(self) -> str:
        return self.credentials["QSTASH_CURRENT_SIGNING_KEY"]

    @property
    def next_key(self) -> str:
        return self.credentials["QSTASH_NEXT_SIGNING_KEY"]

    @property
    def url(self) -> str:
        return self.handle.url

    def app(self):
        return create_app(
            dsn=self.dsn,
            token=self.token,
            current_signing_key=self.current_key,
            next_signing_key=self.next_key,
            schema=self.schema,
            time_scale=TIME_SCALE,
        )

    def start(self) -> LocalServer:
        self.handle = serve_in_thread(self.app())
        return self

    def stop(self) -> None:
        self.handle.stop()
        assert not self.handle.thread.is_alive(), "the local QStash did not shut down"

    def client(self, token: str | None = None) -> QStash:
        return QStash(token or self.token, base_url=self.url, retry=False)

    def local(self, method: str, path: str) -> dict:
        response = httpx.request(
            method, self.url + path, headers={"Authorization": f"Bearer {self.token}"}
        )
        response.raise_for_status()
        return response.json()


@pytest.fixture
def receiver():
    destination = Destination()
    handle = serve_in_thread(destination.app)
    destination.base = handle.url
    yield destination
    handle.stop()


@pytest.fixture
def server(pg_dsn):
    local = LocalServer(pg_dsn).start()
    yield local
    if local.handle.thread.is_alive():
        local.stop()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"drop schema if exists {local.schema} cascade")


@pytest.fixture
def qstash(server) -> QStash:
    return server.client()


def body_hash(body: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(body).digest()).decode()


def events(server: LocalServer, message_id: str) -> list[dict]:
    """The message's log (GET /v2/events), newest first."""
    answer = httpx.get(
        f"{server.url}/v2/events",
        params={"messageId": message_id},
        headers={"Authorization": f"Bearer {server.token}"},
    )
    answer.raise_for_status()
    return answer.json()["events"]


def verify(delivery: Delivery, key: str, url: str) -> dict:
    """Check a delivery's Upstash-Signature independently of the SDK and return its claims."""
    claims = jwt.decode(
        delivery.headers["upstash-signature"],
        key,
        algorithms=["HS256"],
        issuer="Upstash",
        options={"require": ["iss", "sub", "iat", "nbf", "exp", "jti"]},
    )
    assert claims["sub"] == url
    assert claims["body"] == body_hash(delivery.body)
    return claims


# --- publishing and delivery


def test_publish_json_is_delivered_once_with_signature_and_headers(server, qstash, receiver):
    destination = receiver.url("hooks/form?form=f1")
    result = qstash.message.publish_json(
        url=destination, body={"form_id": "f1", "n": 1}, headers={"X-Form-Id": "f1"}
    )

    [delivery] = receiver.wait_for("hooks/form", 1)
    assert delivery.method == "POST"
    assert delivery.query == "form=f1"
    assert delivery.body == b'{"form_id": "f1", "n": 1}'
    assert delivery.headers["content-type"] == "application/json"
    assert delivery.headers["x-form-id"] == "f1"
    assert delivery.headers["upstash-message-id"] == result.message_id
    assert delivery.headers["upstash-retried"] == "0"
    assert delivery.headers["user-agent"] == "Upstash-QStash"
    assert "upstash-schedule-id" not in delivery.headers

    claims = verify(delivery, server.current_key, destination)
    assert claims["iss"] == "Upstash"
    assert claims["nbf"] == 0
    assert claims["exp"] - claims["iat"] == 300
    assert isinstance(claims["jti"], str) and claims["jti"]
    assert claims["body"].endswith("=")  # padded base64url, as QStash sends it
    assert "aud" not in claims
    with pytest.raises(jwt.InvalidSignatureError):
        verify(delivery, server.next_key, destination)
    # The SDK's own receiver accepts it too (with the raw body text).
    Receiver(current_signing_key=server.current_key, next_signing_key=server.next_key).verify(
        signature=delivery.headers["upstash-signature"],
        body=delivery.body.decode(),
        url=destination,
    )

    time.sleep(0.3)
    assert len(receiver.at("hooks/form")) == 1
    with pytest.raises(QStashError, match="404"):
        qstash.message.get(result.message_id)
    states = [
        log.state.value for log in qstash.log.list(filter={"message_id": result.message_id}).logs
    ]
    assert set(states) == {"CREATED", "ACTIVE", "DELIVERED"}


def test_requests_without_the_token_are_rejected(server, receiver):
    response = httpx.post(f"{server.url}/v2/publish/{receiver.url('x')}", content=b"hi")
    assert response.status_code == 401
    assert "error" in response.json()

    with pytest.raises(QStashError, match="401"):
        server.client(token="wrong-" + server.token).message.publish(
            url=receiver.url("x"), body="hi"
        )
    with pytest.raises(QStashError, match="401"):
        server.client(token="wrong").schedule.list()

    # ?qstash_token= works and is not passed on to the destination.
    response = httpx.post(
        f"{server.url}/v2/publish/{receiver.url('q')}?a=1&qstash_token={server.token}",
        content=b"hi",
    )
    assert response.status_code == 200
    [delivery] = receiver.wait_for("q", 1)
    assert delivery.query == "a=1"
    verify(delivery, server.current_key, receiver.url("q") + "?a=1")
    assert len(receiver.at("x")) == 0


def test_failed_attempts_are_retried_with_the_same_message_id(server, qstash, receiver):
    receiver.behaviours["flaky"] = lambda n: (
        PlainTextResponse("busy", 500) if n < 2 else PlainTextResponse("ok")
    )
    result = qstash.message.publish(url=receiver.url("flaky"), body="payload", retries=3)

    attempts = receiver.wait_for("flaky", 3)
    assert [d.headers["upstash-retried"] for d in attempts] == ["0", "1", "2"]
    assert {d.headers["upstash-message-id"] for d in attempts} == {result.message_id}
    jtis = {verify(d, server.current_key, receiver.url("flaky"))["jti"] for d in attempts}
    assert len(jtis) == 3  # a fresh token per attempt
    # Default backoff e^(2.5 n), scaled: about 12 ms, then about 148 ms.
    assert attempts[2].at - attempts[1].at >= 0.12
    time.sleep(0.3)
    assert len(receiver.at("flaky")) == 3
    assert qstash.dlq.list().messages == []


def test_exhausted_retries_go_to_the_dlq_and_call_the_failure_callback(server, qstash, receiver):
    receiver.behaviours["broken"] = lambda n: PlainTextResponse("boom", 500)
    result = qstash.message.publish_json(
        url=receiver.url("broken"),
        body={"form_id": "f2"},
        retries=2,
        headers={"X-Form-Id": "f2"},
        failure_callback=receiver.url("failed"),
        failure_callback_headers={"Forward-X-Source": "local-test"},
    )

    attempts = receiver.wait_for("broken", 3)
    assert [d.headers["upstash-retried"] for d in attempts] == ["0", "1", "2"]
    [callback] = receiver.wait_for("failed", 1)
    verify(callback, server.current_key, receiver.url("failed"))
    assert callback.headers["x-source"] == "local-test"
    assert callback.headers["content-type"] == "application/json"
    assert callback.headers["upstash-message-id"] != result.message_id
    payload = callback.json
    assert payload["status"] == 500
    assert base64.b64decode(payload["body"]) == b"boom"
    assert payload["retried"] == 2
    assert payload["maxRetries"] == 2
    assert payload["sourceMessageId"] == result.message_id
    assert payload["url"] == receiver.url("broken")
    assert payload["method"] == "POST"
    assert base64.b64decode(payload["sourceBody"]) == b'{"form_id": "f2"}'
    assert payload["sourceHeader"]["X-Form-Id"] == ["f2"]
    assert payload["header"]["Content-Type"][0].startswith("text/plain")
    assert isinstance(payload["createdAt"], int) and isinstance(payload["notBefore"], int)

    [entry] = qstash.dlq.list().messages
    assert entry.message_id == result.message_id
    assert entry.dlq_id == payload["dlqId"]
    assert entry.response_status == 500
    assert entry.response_body == "boom"
    assert entry.max_retries == 2
    assert entry.url == receiver.url("broken")
    assert qstash.dlq.get(entry.dlq_id).message_id == result.message_id
    time.sleep(0.3)
    assert len(receiver.at("broken")) == 3
    assert len(receiver.at("failed")) == 1
    qstash.dlq.delete(entry.dlq_id)
    assert qstash.dlq.list().messages == []
    with pytest.raises(QStashError, match="404"):
        qstash.dlq.get(entry.dlq_id)


def test_489_with_non_retryable_header_fails_at_once(server, qstash, receiver):
    receiver.behaviours["permanent"] = lambda n: PlainTextResponse(
        "bad form", 489, headers={"Upstash-NonRetryable-Error": "true"}
    )
    result = qstash.message.publish(url=receiver.url("permanent"), body="x", retries=3)

    receiver.wait_for("permanent", 1)
    deadline = time.monotonic() + 5
    while not (messages := qstash.dlq.list().messages) and time.monotonic() < deadline:
        time.sleep(0.05)
    [entry] = messages
    assert entry.message_id == result.message_id
    assert entry.response_status == 489
    time.sleep(0.3)
    assert len(receiver.at("permanent")) == 1


def test_489_without_the_header_is_retried(server, qstash, receiver):
    receiver.behaviours["plain489"] = lambda n: PlainTextResponse("no", 489)
    qstash.message.publish(url=receiver.url("plain489"), body="x", retries=1)

    attempts = receiver.wait_for("plain489", 2)
    assert [d.headers["upstash-retried"] for d in attempts] == ["0", "1"]
    deadline = time.monotonic() + 5
    while not qstash.dlq.list().messages and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(qstash.dlq.list().messages) == 1


def test_retry_after_from_the_endpoint_is_honoured_unscaled(server, qstash, receiver):
    receiver.behaviours["limited"] = lambda n: (
        PlainTextResponse("slow down", 429, headers={"Retry-After": "1"})
        if n == 0
        else PlainTextResponse("ok")
    )
    qstash.message.publish(url=receiver.url("limited"), body="x")

    first, second = receiver.wait_for("limited", 2, timeout=5)
    assert second.at - first.at >= 0.95  # the scaled default would have been about 12 ms


def test_retry_delay_expression_replaces_the_default_backoff(server, qstash, receiver):
    receiver.behaviours["custom"] = lambda n: (
        PlainTextResponse("no", 500) if n < 2 else PlainTextResponse("ok")
    )
    # 400 s and 800 s of QStash time: 0.4 s and 0.8 s at TIME_SCALE.
    qstash.message.publish(
        url=receiver.url("custom"), body="x", retries=2, retry_delay="400000 * pow(2, retried)"
    )

    first, second, third = receiver.wait_for("custom", 3, timeout=5)
    # The waits planned (each RETRY event's nextDeliveryTime against its own time, which is
    # stamped a statement later than the due time is computed): 0.4 s and 0.8 s, where the
    # scaled default backoff would have been 12 ms and 148 ms. Kept to: no retry came early.
    retries = [
        event
        for event in events(server, first.headers["upstash-message-id"])
        if event["state"] == "RETRY"
    ]
    planned = sorted(event["nextDeliveryTime"] - event["time"] for event in retries)
    assert len(planned) == 2
    assert 150 < planned[0] <= 400 and 550 < planned[1] <= 800
    assert second.at - first.at >= 0.35 and third.at - second.at >= 0.75


def test_deduplication_id_answers_202_with_the_original_id(server, qstash, receiver):
    first = qstash.message.publish_json(
        url=receiver.url("dedup"), body={"a": 1}, deduplication_id="form-f3-deadline"
    )
    second = qstash.message.publish_json(
        url=receiver.url("dedup"), body={"a": 2}, deduplication_id="form-f3-deadline"
    )
    assert not first.deduplicated
    assert second.deduplicated and second.message_id == first.message_id

    response = httpx.post(
        f"{server.url}/v2/publish/{receiver.url('dedup')}",
        content=b"{}",
        headers={
            "Authorization": f"Bearer {server.token}",
            "Upstash-Deduplication-Id": "form-f3-deadline",
        },
    )
    assert response.status_code == 202
    assert response.json() == {"messageId": first.message_id, "deduplicated": True}

    content_a = qstash.message.publish(
        url=receiver.url("content"), body="same", content_based_deduplication=True
    )
    content_b = qstash.message.publish(
        url=receiver.url("content"), body="same", content_based_deduplication=True
    )
    content_c = qstash.message.publish(
        url=receiver.url("content"), body="different", content_based_deduplication=True
    )
    assert content_b.deduplicated and content_b.message_id == content_a.message_id
    assert not content_c.deduplicated

    [delivery] = receiver.wait_for("dedup", 1)
    assert delivery.json == {"a": 1}
    receiver.wait_for("content", 2)
    time.sleep(0.3)
    assert len(receiver.at("dedup")) == 1
    assert sorted(d.body for d in receiver.at("content")) == [b"different", b"same"]


def test_delay_and_not_before_are_respected(server, qstash, receiver):
    published_at = time.time()
    qstash.message.publish(url=receiver.url("delayed"), body="x", delay=2)
    not_before = int(published_at) + 3
    qstash.message.publish(url=receiver.url("not-before"), body="x", not_before=not_before)
    # Not-Before wins over Upstash-Delay.
    qstash.message.publish(
        url=receiver.url("both"), body="x", delay="1h", not_before=int(published_at) + 1
    )

    time.sleep(1.5)
    assert receiver.at("delayed") == [] and receiver.at("not-before") == []
    [delayed] = receiver.wait_for("delayed", 1, timeout=5)
    [timed] = receiver.wait_for("not-before", 1, timeout=5)
    [both] = receiver.wait_for("both", 1, timeout=5)
    assert delayed.at >= published_at + 2
    assert timed.at >= not_before
    assert both.at < published_at + 60


def test_message_get_and_cancel(server, qstash, receiver):
    before = time.time()
    result = qstash.message.publish_json(
        url=receiver.url("later"),
        body={"k": "v"},
        delay=60,
        retries=1,
        headers={"X-Form-Id": "f4"},
        label="deadline",
    )
    after = time.time()
    message = qstash.message.get(result.message_id)
    assert message.message_id == result.message_id
    assert message.url == receiver.url("later")
    assert message.method == "POST"
    assert message.max_retries == 1
    assert message.body == '{"k": "v"}'
    assert message.headers == {"X-Form-Id": ["f4"]}
    assert message.label == "deadline"
    # Published between `before` and `after` (ms, the server may round to whole seconds).
    assert (before + 60 - 1) * 1000 <= message.not_before <= (after + 60 + 1) * 1000
    assert (before - 1) * 1000 <= message.created_at <= (after + 1) * 1000
    default = qstash.message.publish(url=receiver.url("later"), body="x", delay=60)
    assert qstash.message.get(default.message_id).max_retries == 3
    qstash.message.cancel(default.message_id)

    queued = server.local("GET", "/v2/_local/messages")["messages"]
    assert [(m["messageId"], m["state"], m["retried"]) for m in queued] == [
        (result.message_id, "CREATED", 0)
    ]

    qstash.message.cancel(result.message_id)
    with pytest.raises(QStashError, match="404"):
        qstash.message.get(result.message_id)
    with pytest.raises(QStashError, match="404"):
        qstash.message.cancel(result.message_id)

    ids = [
        qstash.message.publish(url=receiver.url("later"), body="x", delay=60).message_id
        for _ in range(3)
    ]
    assert qstash.message.cancel_many(ids[:2]) == 2
    assert qstash.message.cancel_all() == 1
    assert server.local("GET", "/v2/_local/messages")["messages"] == []

    # A cancelled message that was due at once is never delivered either.
    due_now = qstash.message.publish(url=receiver.url("cancelled"), body="x", delay=1)
    qstash.message.cancel(due_now.message_id)
    time.sleep(1.5)
    assert receiver.at("later") == [] and receiver.at("cancelled") == []
    states = [
        log.state.value for log in qstash.log.list(filter={"message_id": result.message_id}).logs
    ]
    assert "CANCELED" in states and "CANCEL_REQUESTED" in states


def test_batch_json_of_150_messages_in_two_requests(server, qstash, receiver):
    server.local("POST", "/v2/_local/stats/reset")
    messages = [
        {"url": receiver.url("batch"), "body": {"i": i}, "headers": {"X-I": str(i)}}
        for i in range(150)
    ]
    answers = qstash.message.batch_json(messages[:100]) + qstash.message.batch_json(messages[100:])
    assert len({answer.message_id for answer in answers}) == 150

    deliveries = receiver.wait_for("batch", 150, timeout=20)
    assert sorted(d.json["i"] for d in deliveries) == list(range(150))
    assert all(d.headers["x-i"] == str(d.json["i"]) for d in deliveries)
    for delivery in deliveries[:5]:
        verify(delivery, server.current_key, receiver.url("batch"))
    time.sleep(0.2)
    assert len(receiver.at("batch")) == 150
    stats = server.local("GET", "/v2/_local/stats")
    assert stats["requests"]["batch"] == 2
    assert stats["requests"]["batchMessages"] == 150
    assert stats["requests"]["publish"] == 0
    assert stats["deliveries"]["delivered"] == 150


def test_a_bad_batch_element_gets_its_own_error(server, receiver):
    response = httpx.post(
        f"{server.url}/v2/batch",
        headers={"Authorization": f"Bearer {server.token}"},
        json=[
            {"destination": receiver.url("ok1"), "headers": {}, "body": "a", "queue": None},
            {"destination": "ftp://nowhere", "headers": {}, "body": "b", "queue": None},
            {"destination": receiver.url("ok2"), "headers": {"Upstash-Delay": "soon"}, "body": "c"},
            {"destination": receiver.url("ok3"), "headers": {}, "body": None},
        ],
    )
    assert response.status_code == 200
    first, second, third, fourth = response.json()
    assert "messageId" in first and "messageId" in fourth
    assert "error" in second and "error" in third
    assert receiver.wait_for("ok1", 1)[0].body == b"a"
    assert receiver.wait_for("ok3", 1)[0].body == b""
    time.sleep(0.2)
    assert receiver.at("ok2") == []


def test_bad_headers_and_destinations_answer_400(server, qstash, receiver):
    url = receiver.url("never")
    for kwargs in (
        {"url": "ftp://example.com/x"},
        {"url": "my-url-group"},
        {"url": url, "delay": "soon"},
        {"url": url, "timeout": "forever"},
        {"url": url, "retry_delay": "__import__('os').system('true')"},
        {"url": url, "retry_delay": "retried.__class__"},
        {"url": url, "method": "TRACE"},
        {"url": url, "flow_control": {"key": "k", "parallelism": 0}},
        {"url": url, "flow_control": {"key": "k", "rate": 5, "period": "often"}},
    ):
        with pytest.raises(QStashError, match="400"):
            qstash.message.publish(body="x", **kwargs)
    response = httpx.post(
        f"{server.url}/v2/publish/{url}",
        content=b"x",
        headers={"Authorization": f"Bearer {server.token}", "Upstash-Retries": "-1"},
    )
    assert response.status_code == 400 and "error" in response.json()
    time.sleep(0.2)
    assert receiver.at("never") == []


def test_method_timeout_and_encoded_destination(server, qstash, receiver):
    async def slow(n):
        await asyncio.sleep(1.5)
        return PlainTextResponse("too late")

    receiver.behaviours["slow"] = slow
    qstash.message.publish(url=receiver.url("put"), body="x", method="PUT")
    result = qstash.message.publish(url=receiver.url("slow"), body="x", timeout=1, retries=0)
    encoded = httpx.post(
        f"{server.url}/v2/publish/" + urllib.parse.quote(receiver.url("enc"), safe=""),
        content=b"x",
        headers={"Authorization": f"Bearer {server.token}"},
    )
    assert encoded.status_code == 200

    assert receiver.wait_for("put", 1)[0].method == "PUT"
    verify(receiver.wait_for("enc", 1)[0], server.current_key, receiver.url("enc"))
    receiver.wait_for("slow", 1)
    deadline = time.monotonic() + 5
    while not (messages := qstash.dlq.list().messages) and time.monotonic() < deadline:
        time.sleep(0.05)
    [entry] = messages
    assert entry.message_id == result.message_id
    assert entry.response_status == 0  # timed out: no HTTP status


def test_success_callback_receives_the_response(server, qstash, receiver):
    receiver.behaviours["answered"] = lambda n: PlainTextResponse("call placed", 201)
    result = qstash.message.publish(
        url=receiver.url("answered"), body="x", callback=receiver.url("callback")
    )
    [callback] = receiver.wait_for("callback", 1)
    verify(callback, server.current_key, receiver.url("callback"))
    payload = callback.json
    assert payload["status"] == 201
    assert base64.b64decode(payload["body"]) == b"call placed"
    assert payload["sourceMessageId"] == result.message_id
    assert "retried" not in payload  # QStash leaves it out on the first attempt


# --- schedules


def test_schedule_create_is_create_or_overwrite(server, qstash, receiver):
    destination = receiver.url("sweep")
    first = qstash.schedule.create(
        destination=destination, cron="*/5 * * * *", schedule_id="check-forms", retries=2
    )
    second = qstash.schedule.create(
        destination=destination, cron="0 * * * *", schedule_id="check-forms", retries=2
    )
    assert first == second == "check-forms"
    [schedule] = qstash.schedule.list()
    assert schedule.schedule_id == "check-forms"
    assert schedule.cron == "0 * * * *"
    assert schedule.destination == destination
    assert schedule.retries == 2
    assert schedule.method == "POST"
    assert not schedule.paused
    assert schedule.next_schedule_time % 3_600_000 == 0

    qstash.schedule.pause("check-forms")
    assert qstash.schedule.get("check-forms").paused
    qstash.schedule.resume("check-forms")
    assert not qstash.schedule.get("check-forms").paused

    other = qstash.schedule.create(
        destination=destination, cron="CRON_TZ=America/New_York 0 4 * * *"
    )
    assert other.startswith("scd_")
    assert len(qstash.schedule.list()) == 2
    qstash.schedule.delete(other)
    with pytest.raises(QStashError, match="404"):
        qstash.schedule.get(other)
    assert [s.schedule_id for s in qstash.schedule.list()] == ["check-forms"]

    with pytest.raises(QStashError, match="400"):
        qstash.schedule.create(destination=destination, cron="every minute")
    with pytest.raises(QStashError, match="400"):
        qstash.schedule.create(destination=destination, cron="* * * * *", schedule_id="a/b c")
    with pytest.raises(QStashError, match="400"):
        qstash.schedule.create(destination=destination, cron="CRON_TZ=Mars/Base 0 4 * * *")


def test_schedule_trigger_delivers_an_empty_body_with_the_schedule_id(server, qstash, receiver):
    qstash.schedule.create(
        destination=receiver.url("tick"),
        cron="0 0 1 1 *",
        schedule_id="sweep.v1",
        headers={"X-Job": "sweep"},
    )
    first = server.local("POST", "/v2/_local/schedules/sweep.v1/trigger")["messageId"]
    second = server.local("POST", "/v2/_local/schedules/sweep.v1/trigger")["messageId"]
    assert first != second  # each trigger is a new message

    deliveries = receiver.wait_for("tick", 2)
    assert {d.headers["upstash-message-id"] for d in deliveries} == {first, second}
    for delivery in deliveries:
        assert delivery.body == b""
        assert delivery.headers["upstash-schedule-id"] == "sweep.v1"
        assert delivery.headers["x-job"] == "sweep"
        claims = verify(delivery, server.current_key, receiver.url("tick"))
        assert claims["body"] == body_hash(b"")
    assert qstash.schedule.get("sweep.v1").last_schedule_time is not None
    response = httpx.post(
        f"{server.url}/v2/_local/schedules/nope/trigger",
        headers={"Authorization": f"Bearer {server.token}"},
    )
    assert response.status_code == 404


def test_schedules_fire_at_their_cron_tick(server, qstash, receiver):
    qstash.schedule.create(
        destination=receiver.url("cron"),
        schedule_id="morning",
        cron="CRON_TZ=America/New_York 0 4 * * *",
    )
    qstash.schedule.create(
        destination=receiver.url("paused"), cron="*/5 * * * *", schedule_id="paused"
    )
    qstash.schedule.pause("paused")
    next_tick = datetime.fromtimestamp(
        qstash.schedule.get("morning").next_schedule_time / 1000, ZoneInfo("America/New_York")
    )
    assert (next_tick.hour, next_tick.minute) == (4, 0)

    # Pretend both ticks were missed a few times: each schedule catches up with one trigger.
    with psycopg.connect(server.dsn, autocommit=True) as conn:
        conn.execute(
            f"update {server.schema}.schedules set next_fire_at = now() - interval '3 days'"
        )
    [delivery] = receiver.wait_for("cron", 1, timeout=5)
    assert delivery.headers["upstash-schedule-id"] == "morning"
    time.sleep(1.2)
    assert len(receiver.at("cron")) == 1
    assert receiver.at("paused") == []
    for schedule_id in ("morning", "paused"):
        assert qstash.schedule.get(schedule_id).next_schedule_time > time.time() * 1000
    assert qstash.schedule.get("morning").last_schedule_time is not None
    assert qstash.schedule.get("paused").last_schedule_time is None


# --- flow control


def test_flow_control_parallelism_caps_deliveries_in_flight(server, qstash, receiver):
    async def slow(n):
        await asyncio.sleep(0.25)
        return PlainTextResponse("ok")

    receiver.behaviours["limited"] = slow
    receiver.behaviours["unlimited"] = slow
    for i in range(8):
        qstash.message.publish(
            url=receiver.url("limited"), body=str(i), flow_control={"key": "vapi", "parallelism": 2}
        )
        qstash.message.publish(url=receiver.url("unlimited"), body=str(i))

    assert len(receiver.wait_for("limited", 8, timeout=10)) == 8
    receiver.wait_for("unlimited", 8)
    time.sleep(0.3)
    assert receiver.max_in_flight["limited"] == 2
    assert receiver.max_in_flight["unlimited"] > 2  # the measurement can see more than two
    stats = server.local("GET", "/v2/_local/stats")
    assert stats["flowControl"]["vapi"]["maxInFlight"] == 2
    assert stats["deliveries"]["delivered"] == 16


def test_flow_control_rate_limits_starts_per_period(server, qstash, receiver):
    for i in range(4):
        qstash.message.publish(
            url=receiver.url("rated"),
            body=str(i),
            flow_control={"key": "rated", "rate": 2, "period": 1},
        )
    deliveries = sorted(receiver.wait_for("rated", 4, timeout=10), key=lambda d: d.at)
    assert deliveries[2].at - deliveries[0].at >= 0.95
    assert deliveries[3].at - deliveries[1].at >= 0.95


# --- durability


def test_a_restarted_server_still_delivers_queued_messages(server, qstash, receiver):
    result = qstash.message.publish(url=receiver.url("durable"), body="kept", delay=2)
    qstash.schedule.create(
        destination=receiver.url("sweep"), cron="0 * * * *", schedule_id="kept-schedule"
    )
    server.stop()
    assert receiver.at("durable") == []  # so the delivery below is the new server's

    server.start()
    restarted = server.client()
    [delivery] = receiver.wait_for("durable", 1, timeout=10)
    assert delivery.headers["upstash-message-id"] == result.message_id
    assert delivery.body == b"kept"
    verify(delivery, server.current_key, receiver.url("durable"))
    assert [s.schedule_id for s in restarted.schedule.list()] == ["kept-schedule"]
    again = restarted.message.publish(url=receiver.url("durable"), body="kept", delay=2)
    assert again.message_id != result.message_id
    restarted.message.cancel(again.message_id)
    time.sleep(0.3)
    assert len(receiver.at("durable")) == 1


def test_a_delivery_cut_short_by_a_stop_is_delivered_again(server, qstash, receiver):
    async def hang_first(n):
        await asyncio.sleep(1.5 if n == 0 else 0)
        return PlainTextResponse("ok")

    receiver.behaviours["interrupted"] = hang_first
    result = qstash.message.publish(url=receiver.url("interrupted"), body="again")
    receiver.wait_for("interrupted", 1)
    server.stop()
    server.start()

    first, second = receiver.wait_for("interrupted", 2, timeout=10)
    assert (
        first.headers["upstash-message-id"]
        == second.headers["upstash-message-id"]
        == result.message_id
    )
    time.sleep(0.3)
    assert len(receiver.at("interrupted")) == 2
    assert server.local("GET", "/v2/_local/messages")["messages"] == []


def test_two_servers_can_create_the_same_schema_at_once(pg_dsn, receiver):
    first, second = LocalServer(pg_dsn), LocalServer(pg_dsn)
    second.schema = first.schema
    second.credentials = first.credentials
    threads = [threading.Thread(target=s.start) for s in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        ids = [
            s.client().message.publish(url=receiver.url("shared"), body="x").message_id
            for s in (first, second)
        ]
        deliveries = receiver.wait_for("shared", 2)
        assert sorted(d.headers["upstash-message-id"] for d in deliveries) == sorted(ids)
    finally:
        first.stop()
        second.stop()
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(f"drop schema if exists {first.schema} cascade")


def test_keys_and_generated_credentials(server, qstash):
    keys = qstash.signing_key.get()
    assert (keys.current, keys.next) == (server.current_key, server.next_key)
    credentials = generate_dev_credentials()
    assert set(credentials) == {
        "QSTASH_TOKEN",
        "QSTASH_CURRENT_SIGNING_KEY",
        "QSTASH_NEXT_SIGNING_KEY",
    }
    for name in ("QSTASH_CURRENT_SIGNING_KEY", "QSTASH_NEXT_SIGNING_KEY"):
        assert credentials[name].startswith("sig_") and len(credentials[name]) == 32
    assert credentials != generate_dev_credentials()
    # The public dev-server key must never come out of here.
    assert "sig_7kYjw48mhY7kAjqNGcy6cr29RJ6r" not in credentials.values()
