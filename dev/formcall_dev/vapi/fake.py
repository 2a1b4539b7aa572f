"""A fake Vapi for tests and the dev stack: the call API, line limit, faults, and calls that report as Vapi's do."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import hashlib
import hmac
import itertools
import json
import math
import random
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from formcall_dev.vapi.validation import validate_create_call

CONCURRENCY_ENDED_REASON = "call.start.error-subscription-concurrency-limit-reached"
COMPLETED_ENDED_REASON = "customer-ended-call"
# What can become of a placed call (`hold`: it rings until end_call), and how Vapi says it ended.
PLAY_OUTCOMES = (
    "reached",
    "voicemail",
    "no_answer",
    "busy",
    "not_connected",
    "bad_number",
    "opt_out",
    "hold",
)
END_OUTCOMES = PLAY_OUTCOMES[:-1]
CONNECTED_OUTCOMES = frozenset({"reached", "voicemail", "opt_out"})
ENDED_REASONS = {
    "reached": COMPLETED_ENDED_REASON,
    "opt_out": "assistant-ended-call",
    "voicemail": "voicemail",
    "no_answer": "customer-did-not-answer",
    "busy": "customer-busy",
    "not_connected": "twilio-failed-to-connect-call",
    "bad_number": "twilio-reported-customer-misdialed",
}
SUMMARIES = {
    "reached": "The assistant reminded the patient about the overdue forms.",
    "opt_out": "The patient asked not to be called again.",
    "voicemail": "The assistant left a voicemail asking for a call back.",
}
# Made-up words, never a real patient's; formcall must ignore them all the same.
TRANSCRIPTS = {
    "reached": "AI: Hello, this is your clinic calling about forms that are due.\n"
    "User: Thanks, I will fill them in today.",
    "opt_out": "AI: Hello, this is your clinic calling about forms that are due.\n"
    "User: Please do not call me again.",
    "voicemail": "AI: This is your clinic. Please call us back about your forms.",
}
# The server messages the fake sends; without `serverMessages` Vapi's default list has both.
REPORTED_TYPES = ("status-update", "end-of-call-report")
SETTINGS = (
    "concurrency_limit",
    "call_duration",
    "latency",
    "ring_seconds",
    "time_scale",
    "outcome_mix",
    "scripts",
    "seed",
    "hold",
    "credentials",
    "report_drop_rate",
    "report_duplicate_rate",
    "reorder",
    "durations",
    "blocked_behaviour",
)
# What Vapi does with a call over the line limit: end it at once with CONCURRENCY_ENDED_REASON,
# or queue it until a line frees (its guide says new dials "wait until a slot becomes free").
BLOCKED_BEHAVIOURS = ("end", "queue")
# The spread of a lognormal duration when the setting names only its median.
DEFAULT_SIGMA = 0.6
INVALID_KEY_MESSAGE = (
    "Invalid Key. Hot tip, you may be using the private key instead of the public key, "
    "or vice versa."
)

# Fields of the request that the Call resource carries back.
_ECHOED_FIELDS = (
    "assistantId",
    "assistant",
    "assistantOverrides",
    "squadId",
    "squad",
    "workflowId",
    "workflow",
    "phoneNumberId",
    "phoneNumber",
    "customer",
    "customerId",
    "name",
    "schedulePlan",
    "transport",
)
_LIST_FILTERS = {
    f"{f}{op}": (f, op) for f in ("createdAt", "updatedAt") for op in ("Gt", "Lt", "Ge", "Le")
}
_TRANSPORT_KEY = "formcall_dev.vapi.fake.transport"


def iso(moment: datetime) -> str:
    """Vapi's timestamp format: ISO 8601 UTC with milliseconds and a Z."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _now() -> datetime:
    moment = datetime.now(UTC)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def error_body(status: int, message: str | list[str] | None = None) -> dict[str, Any]:
    """The NestJS error envelope Vapi answers with."""
    phrase = HTTPStatus(status).phrase
    if message is None:
        message = [phrase] if status == 400 else phrase
    return {"message": message, "error": phrase, "statusCode": status}


def form_id_of(body: Any) -> str | None:
    """The formId formcall puts in `assistantOverrides.metadata`, if the body has one."""
    overrides = body.get("assistantOverrides") if isinstance(body, dict) else None
    metadata = overrides.get("metadata") if isinstance(overrides, dict) else None
    value = metadata.get("formId") if isinstance(metadata, dict) else None
    return value if isinstance(value, str) else None


def form_ids_of(body: Any) -> list[str]:
    """Every form a call covers: `metadata.formIds`, else the single `metadata.formId`."""
    overrides = body.get("assistantOverrides") if isinstance(body, dict) else None
    metadata = overrides.get("metadata") if isinstance(overrides, dict) else None
    ids = metadata.get("formIds") if isinstance(metadata, dict) else None
    if isinstance(ids, list) and all(isinstance(i, str) for i in ids):
        return list(ids)
    form_id = form_id_of(body)
    return [form_id] if form_id else []


def _customer_number_of(body: Any) -> str | None:
    customer = body.get("customer") if isinstance(body, dict) else None
    number = customer.get("number") if isinstance(customer, dict) else None
    return number if isinstance(number, str) else None


def hmac_signature(secret: str, timestamp: str, raw_body: bytes) -> str:
    """Vapi's HMAC credential: hex HMAC-SHA256 of `{timestamp}.{body}`."""
    return hmac.new(
        secret.encode(), timestamp.encode() + b"." + raw_body, hashlib.sha256
    ).hexdigest()


@dataclass
class Rule:
    """A fault to inject into create-call requests that match it.

    Matches on `customer_number` and/or `form_id` (neither: every request), for `times`
    requests (None: unlimited). With `status`, answer that status and `body` (default: a
    Vapi-shaped error) without placing a call, or, with `place`, after placing it (a 5xx from
    a Vapi that did create the call). Otherwise the call is placed, then the answer waits
    `delay` seconds and, with `drop`, the connection is closed without a response.
    """

    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    customer_number: str | None = None
    form_id: str | None = None
    times: int | None = None
    status: int | None = None
    body: Any = None
    headers: dict[str, str] | None = None
    delay: float = 0.0
    drop: bool = False
    place: bool = False
    hits: int = 0

    def __post_init__(self) -> None:
        if self.status is not None and not 100 <= self.status <= 599:
            raise ValueError("status must be an HTTP status code")
        if self.status is not None and self.drop:
            raise ValueError("a rule either answers a status or drops the connection, not both")
        if self.status is None and not self.drop and not self.delay:
            raise ValueError("a rule needs a status, a delay or drop")
        if self.place and self.status is None:
            raise ValueError("place goes with a status: without one the call is placed anyway")
        if self.delay < 0 or (self.times is not None and self.times < 1):
            raise ValueError("delay must be >= 0 and times >= 1 (or null for unlimited)")

    @classmethod
    def from_json(cls, data: Any) -> Rule:
        allowed = {f.name for f in fields(cls)} - {"id", "hits"}
        if not isinstance(data, dict):
            raise ValueError("a rule must be a JSON object")
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ValueError(f"unknown rule fields: {', '.join(unknown)}")
        return cls(**data)

    def matches(self, customer_number: str | None, form_id: str | None) -> bool:
        return (
            (self.times is None or self.hits < self.times)
            and self.customer_number in (None, customer_number)
            and self.form_id in (None, form_id)
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RecordedRequest:
    """One create-call request and what the fake did with it.

    outcome: "placed" (a line was taken; also when the answer was delayed, dropped or an
    injected status with `place`), "blocked" (created over the concurrency limit and ended at
    once), "queued" (created over the limit, waiting for a line: it rings when one frees) or
    "rejected" (no call; `reason` is "unauthorized", "invalid" or "injected").
    """

    seq: int
    at: str
    body: Any
    form_id: str | None
    outcome: str
    status: int | None
    reason: str | None = None
    call_id: str | None = None
    rule_id: str | None = None
    delay: float = 0.0
    dropped: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Delivery:
    """One attempt to deliver a server message to a call's server URL.

    `status` is the call status a status-update carries (None for other messages); `answer`
    the HTTP status the server gave (None: no answer, see `error`). `dropped`: a fault
    swallowed the message (nothing was sent); `duplicate`: the second copy of a message.
    """

    seq: int
    at: str
    call_id: str
    type: str
    status: str | None
    ended_reason: str | None
    attempt: int
    answer: int | None
    error: str | None = None
    signed: bool = False
    dropped: bool = False
    duplicate: bool = False

    @property
    def ok(self) -> bool:
        return self.answer is not None and 200 <= self.answer < 300

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Call:
    """A call and its timeline; the state at any moment is a function of the timeline.

    started: when it took a line and began ringing (None: blocked, or queued for a line);
    answered: when someone or something picked up (None: never connects); ends: when it
    ends (None: holds, ringing until told). A GET and every message read the same view.
    """

    seq: int
    data: dict[str, Any]
    created: datetime
    blocked: bool
    form_ids: list[str]
    outcome: str | None = None
    queued: bool = False
    # Seconds the call holds its line, drawn from `durations` (None: ring + call_duration).
    length: float | None = None
    started: datetime | None = None
    answered: datetime | None = None
    ends: datetime | None = None
    server: dict[str, Any] | None = None
    message_types: frozenset[str] = frozenset()
    reported: set[str] = field(default_factory=set)
    generation: int = 0
    # Set (on the background loop) when end_call changes the timeline.
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def id(self) -> str:
        return self.data["id"]

    def ended(self, now: datetime) -> bool:
        return self.blocked or (self.ends is not None and now >= self.ends)

    def status(self, now: datetime) -> str:
        if self.ended(now):
            return "ended"
        if self.started is None or now < self.started:
            return "queued"
        if self.answered is not None and now >= self.answered:
            return "in-progress"
        return "ringing"

    def connected(self) -> bool:
        return self.answered is not None and (self.ends is None or self.answered <= self.ends)

    def view(self, now: datetime, status: str | None = None) -> dict[str, Any]:
        """The Call resource at `now` (as a GET would show it), or in the phase `status`."""
        data = dict(self.data)
        if self.blocked:
            return data
        status = status or self.status(now)
        data["status"] = status
        if status in ("queued", "ringing"):
            if status == "ringing" and self.started is not None:
                data["updatedAt"] = iso(self.started)
            return data
        assert self.answered is not None or status == "ended"
        if self.answered is not None and self.connected():
            data["startedAt"] = iso(self.answered)
            data["updatedAt"] = iso(self.answered)
        if status == "ended":
            assert self.ends is not None and self.outcome is not None
            data.update(
                status="ended",
                endedReason=ENDED_REASONS[self.outcome],
                endedAt=iso(self.ends),
                updatedAt=iso(self.ends),
                cost=self.cost(),
                analysis=_analysis(self.outcome),
            )
        return data

    def cost(self) -> float:
        if not self.connected() or self.ends is None or self.answered is None:
            return 0
        minutes = (self.ends - self.answered).total_seconds() / 60
        return round(0.01 + 0.1 * minutes, 4)

    def updated(self, now: datetime) -> datetime:
        if self.blocked:
            return self.created
        if self.ended(now):
            assert self.ends is not None
            return self.ends
        if self.answered is not None and now >= self.answered:
            return self.answered
        if self.started is not None and now >= self.started:
            return self.started
        return self.created

    def line(self) -> dict[str, Any]:
        """When the call took and left its line, as the line statistics show it."""
        return {
            "id": self.id,
            "formIds": self.form_ids,
            "outcome": self.outcome,
            "blocked": self.blocked,
            "queued": self.queued,
            "created": self.created.timestamp(),
            "started": self.started.timestamp() if self.started else None,
            "answered": self.answered.timestamp() if self.answered else None,
            "ended": self.ends.timestamp() if self.ends else None,
        }


def _analysis(outcome: str) -> dict[str, Any]:
    return {
        "summary": SUMMARIES.get(outcome, "The call did not connect."),
        "structuredData": {"optOut": outcome == "opt_out"},
    }


def _artifact(outcome: str) -> dict[str, Any]:
    # A made-up conversation: formcall must ignore it (transcripts are PHI).
    return {"transcript": TRANSCRIPTS.get(outcome, ""), "messages": []}


class _DropConnection:
    """An ASGI response that closes the client's connection without answering."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        transport = scope.get(_TRANSPORT_KEY)
        if transport is not None:
            transport.abort()
            # Let uvicorn see the connection is lost, so it neither logs nor answers a 500.
            for _ in range(3):
                await asyncio.sleep(0)
            return
        # A server that hides its transport: promise a body and never send it.
        await send(
            {
                "type": "http.response.start",
                "status": 201,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"4096")],
            }
        )


class _App(Starlette):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # uvicorn passes its request cycle's bound `send`; its transport is what a drop closes.
        if scope["type"] == "http":
            scope[_TRANSPORT_KEY] = getattr(getattr(send, "__self__", None), "transport", None)
        await super().__call__(scope, receive, send)


class CallAlreadyEnded(Exception):
    """end_call on a call that has ended (HTTP 409)."""


class FakeVapi:
    """Vapi's call API in memory, playing every placed call; one lock guards the state.

    Each placed call rings, is answered or not, ends, and reports its progress to its
    `assistantOverrides.server.url` as Vapi does (see `_due_messages`). Its fate: the next entry
    of the customer number's script, else `hold` (ring until told), else a draw from the
    outcome mix (seeded; default always reached). Timers and deliveries run on one background
    asyncio loop, so the server's event loop never waits on them.

    Settings (constructor, configure, POST /_fake/configure): concurrency_limit, latency (s
    before each create-call answer), ring_seconds (default 0: answered at once), call_duration
    (talk time of reached and voicemail calls), durations (per outcome, the seconds a call
    holds its line, ring included: `[low, high]` uniform, a number, or `{"lognormal_median": m,
    "sigma": s, "min": a, "max": b}`; drawn from the seed, in place of ring + call_duration),
    time_scale (multiplies ring, talk, durations and backoff delays), outcome_mix ({outcome:
    weight}), seed, scripts ({number: [outcome, ...]}), hold, credentials ({credentialId: HMAC
    secret}), report_drop_rate, report_duplicate_rate, reorder (the final status-update after
    the end-of-call report) and blocked_behaviour (a call over the limit: "end", ended at once
    with CONCURRENCY_ENDED_REASON, or "queue", answered `queued` and started when a line frees,
    first come first served).

    Python API: configure, add_rule, clear_rules, rules, requests, placed_calls, calls_for_form,
    get_call, end_call, reports, max_concurrent, lines_in_use, line_stats, stats, reset, close.
    The same over HTTP (bearer key needed): GET /_fake/requests[?formId=], GET
    /_fake/calls[?formId=], POST /_fake/calls/{id}/end {"outcome"}, GET /_fake/reports[?callId=],
    GET /_fake/lines, GET /_fake/stats, POST /_fake/reset, POST /_fake/configure,
    GET|POST|DELETE /_fake/rules.
    """

    def __init__(
        self,
        *,
        api_key: str,
        concurrency_limit: int = 10,
        call_duration: float = 0.0,
        latency: float = 0.0,
        ring_seconds: float = 0.0,
        time_scale: float = 1.0,
        outcome_mix: dict[str, float] | None = None,
        scripts: dict[str, list[str]] | None = None,
        seed: int = 0,
        hold: bool = False,
        credentials: dict[str, str] | None = None,
        report_drop_rate: float = 0.0,
        report_duplicate_rate: float = 0.0,
        reorder: bool = False,
        durations: dict[str, Any] | None = None,
        blocked_behaviour: str = "end",
    ) -> None:
        self.api_key = api_key
        self.org_id = str(uuid.uuid4())
        self._defaults = _checked_settings(
            {
                "concurrency_limit": concurrency_limit,
                "call_duration": call_duration,
                "latency": latency,
                "ring_seconds": ring_seconds,
                "time_scale": time_scale,
                "outcome_mix": outcome_mix or {"reached": 1},
                "scripts": scripts or {},
                "seed": seed,
                "hold": hold,
                "credentials": credentials or {},
                "report_drop_rate": report_drop_rate,
                "report_duplicate_rate": report_duplicate_rate,
                "reorder": reorder,
                "durations": durations or {},
                "blocked_behaviour": blocked_behaviour,
            }
        )
        self._lock = threading.Lock()
        self._seq = itertools.count(1)
        self._report_seq = itertools.count(1)
        self._generation = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._client: httpx.AsyncClient | None = None
        self._tasks: set[concurrent.futures.Future[None]] = set()
        # The task that starts queued calls as lines free, and its wake-up (both on the loop).
        self._keeper: int | None = None
        self._keeper_wake: asyncio.Event | None = None
        self.reset()
        self.app = _App(
            routes=[
                Route("/call", self._create_call, methods=["POST"]),
                Route("/call", self._list_calls, methods=["GET"]),
                Route("/call/{call_id}", self._get_call, methods=["GET"]),
                Route("/_fake/requests", self._admin_requests, methods=["GET"]),
                Route("/_fake/calls", self._admin_calls, methods=["GET"]),
                Route("/_fake/calls/{call_id}/end", self._admin_end_call, methods=["POST"]),
                Route("/_fake/reports", self._admin_reports, methods=["GET"]),
                Route("/_fake/lines", self._admin_lines, methods=["GET"]),
                Route("/_fake/stats", self._admin_stats, methods=["GET"]),
                Route("/_fake/reset", self._admin_reset, methods=["POST"]),
                Route("/_fake/configure", self._admin_configure, methods=["POST"]),
                Route("/_fake/rules", self._admin_rules, methods=["GET", "POST", "DELETE"]),
            ],
            lifespan=self._lifespan,
        )

    # ---- Python API -------------------------------------------------------------------------

    def configure(
        self,
        *,
        concurrency_limit: int | None = None,
        call_duration: float | None = None,
        latency: float | None = None,
        ring_seconds: float | None = None,
        time_scale: float | None = None,
        outcome_mix: dict[str, float] | None = None,
        scripts: dict[str, list[str]] | None = None,
        seed: int | None = None,
        hold: bool | None = None,
        credentials: dict[str, str] | None = None,
        report_drop_rate: float | None = None,
        report_duplicate_rate: float | None = None,
        reorder: bool | None = None,
        durations: dict[str, Any] | None = None,
        blocked_behaviour: str | None = None,
    ) -> None:
        """Change settings for the calls that come next; None leaves a setting as it is.

        A new seed (or outcome mix, or durations) restarts the random sequences; scripts replace
        the current ones. A higher concurrency_limit starts queued calls at once.
        """
        given = {
            name: value
            for name, value in locals().items()
            if name in SETTINGS and value is not None
        }
        self._apply(_checked_settings(given))
        self._wake_keeper()

    def add_rule(
        self,
        *,
        customer_number: str | None = None,
        form_id: str | None = None,
        times: int | None = None,
        status: int | None = None,
        body: Any = None,
        headers: dict[str, str] | None = None,
        delay: float = 0.0,
        drop: bool = False,
        place: bool = False,
    ) -> str:
        """Add a fault rule (see `Rule`); rules are tried in the order added. Returns its id."""
        rule = Rule(
            customer_number=customer_number,
            form_id=form_id,
            times=times,
            status=status,
            body=body,
            headers=headers,
            delay=delay,
            drop=drop,
            place=place,
        )
        with self._lock:
            self._rules.append(rule)
        return rule.id

    def clear_rules(self) -> None:
        with self._lock:
            self._rules.clear()

    def rules(self) -> list[dict[str, Any]]:
        with self._lock:
            return [rule.to_json() for rule in self._rules]

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def placed_calls(self) -> list[dict[str, Any]]:
        """Calls that took a line (or wait in the queue for one), oldest first, as
        GET /call/{id} would show them now."""
        now = _now()
        with self._lock:
            self._settle(now)
            return [call.view(now) for call in self._calls if not call.blocked]

    def calls_for_form(self, form_id: str) -> list[dict[str, Any]]:
        """Placed calls covering the form (its `metadata.formId` or one of `formIds`)."""
        return [call for call in self.placed_calls() if form_id in form_ids_of(call)]

    def get_call(self, call_id: str) -> dict[str, Any] | None:
        now = _now()
        with self._lock:
            self._settle(now)
            call = self._calls_by_id.get(call_id)
            return call.view(now) if call else None

    def end_call(self, call_id: str, outcome: str) -> dict[str, Any]:
        """Play the patient: end a ringing or in-progress call with `outcome` now.

        Raises KeyError (unknown call), ValueError (not an outcome) or CallAlreadyEnded. The
        reports still due go out at once. Returns the call as it now is.
        """
        if outcome not in END_OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(END_OUTCOMES)}")
        with self._lock:
            call = self._calls_by_id.get(call_id)
            if call is None:
                raise KeyError(call_id)
            now = _now()
            self._settle(now)
            if call.ended(now):
                raise CallAlreadyEnded(call_id)
            if call.started is None:
                call.started = now  # a queued call the patient never heard: it ends unrung
            if outcome in CONNECTED_OUTCOMES:
                if call.answered is None or call.answered > now:
                    call.answered = now
            elif call.answered is not None and call.answered > now:
                call.answered = None  # it was going to be answered; now it never is
            call.outcome, call.ends = outcome, now
            if call in self._queue:
                self._queue.remove(call)
            self._settle(now)  # its line goes to the oldest queued call
            loop = self._loop
            view = call.view(now)
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(call.wake.set)
        self._wake_keeper()
        return view

    def reports(self, call_id: str | None = None) -> list[Delivery]:
        """Every delivery attempt of a server message, oldest first (one call's, with call_id)."""
        with self._lock:
            return [d for d in self._deliveries if call_id is None or d.call_id == call_id]

    @property
    def max_concurrent(self) -> int:
        with self._lock:
            return self._max_concurrent

    def lines_in_use(self) -> int:
        with self._lock:
            return self._settle(_now())

    def line_stats(self) -> dict[str, Any]:
        """What a benchmark measures of the lines: every call's created, started (took a line),
        answered and ended moments (epoch seconds; ended in the future for a call still on its
        line, None while it holds), the lines in use over time as [moment, in use] steps up to
        now, the most in use, refusals and queued answers, and calls per form (doubles)."""
        now = _now()
        with self._lock:
            self._settle(now)
            calls = [call.line() for call in self._calls]
            refused = sum(call.blocked for call in self._calls)
            queued = sum(call.queued for call in self._calls)
            waiting = len(self._queue)
        series = line_series(calls, until=now.timestamp())
        per_form: dict[str, int] = {}
        for call in calls:
            if not call["blocked"]:
                for form_id in call["formIds"]:
                    per_form[form_id] = per_form.get(form_id, 0) + 1
        return {
            "series": series,
            "max_in_use": max((n for _, n in series), default=0),
            "refused": refused,
            "queued": queued,
            "waiting": waiting,
            "calls": calls,
            "calls_per_form": per_form,
            "doubles": sum(1 for n in per_form.values() if n > 1),
        }

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": len(self._requests),
                "placed": self._count("outcome", "placed"),
                "blocked": self._count("outcome", "blocked"),
                "queued": self._count("outcome", "queued"),
                "waiting": len(self._queue),
                "rejected": self._count("outcome", "rejected"),
                "unauthorized": self._count("reason", "unauthorized"),
                "invalid": self._count("reason", "invalid"),
                "injected": self._count("reason", "injected"),
                "dropped": sum(r.dropped for r in self._requests),
                "lines_in_use": self._settle(_now()),
                "max_concurrent": self._max_concurrent,
                "rules": len(self._rules),
                "reports": len(self._deliveries),
                "reports_failed": sum(not d.ok and not d.dropped for d in self._deliveries),
                "reports_dropped": sum(d.dropped for d in self._deliveries),
                "calls_playing": len(self._tasks),
                **{name: value for name, value in self._settings.items() if name != "credentials"},
                "credentials": sorted(self._settings["credentials"]),  # ids only, never secrets
            }

    def reset(self) -> None:
        """Forget requests, calls, reports and rules, cancel every call still playing, and go
        back to the constructor's settings."""
        with self._lock:
            self._generation += 1
            self._settings: dict[str, Any] = {}
            self._apply_locked(copy.deepcopy(self._defaults))
            self._rules: list[Rule] = []
            self._requests: list[RecordedRequest] = []
            self._calls: list[_Call] = []
            self._calls_by_id: dict[str, _Call] = {}
            self._active: dict[str, _Call] = {}
            self._queue: list[_Call] = []
            self._deliveries: list[Delivery] = []
            self._max_concurrent = 0
            tasks, self._tasks = self._tasks, set()
        # Outside the lock: a cancelled future runs its done-callback in this thread.
        for task in tasks:
            task.cancel()

    def close(self) -> None:
        """Stop playing calls and shut the background loop down (it restarts when needed)."""
        with self._lock:
            self._generation += 1
            tasks, self._tasks = self._tasks, set()
            loop, thread, client = self._loop, self._loop_thread, self._client
            self._loop = self._loop_thread = self._client = None
        for task in tasks:
            task.cancel()
        if loop is None or loop.is_closed():
            return
        if client is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(client.aclose(), loop).result(timeout=5)
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout=5)
        if not loop.is_running():
            loop.close()

    # ---- settings, under the lock -----------------------------------------------------------

    def _apply(self, settings: dict[str, Any]) -> None:
        with self._lock:
            self._apply_locked(settings)

    def _apply_locked(self, settings: dict[str, Any]) -> None:
        if "scripts" in settings:
            settings["scripts"] = {
                number: list(script) for number, script in settings["scripts"].items()
            }
        self._settings.update(settings)
        if {"seed", "outcome_mix", "durations"} & set(settings):
            self._mix_random = random.Random(self._settings["seed"])
            # Faults and durations draw from their own sequences, so they never shift the mix's.
            self._fault_random = random.Random(self._settings["seed"] + 1)
            self._duration_random = random.Random(self._settings["seed"] + 2)

    # ---- state changes, under the lock ------------------------------------------------------

    def _count(self, attribute: str, value: str) -> int:
        return sum(getattr(r, attribute) == value for r in self._requests)

    def _settle(self, now: datetime) -> int:
        """Free the lines of the calls ended by `now`, in the order they ended, each going to
        the oldest queued call at the moment it freed; returns the lines in use."""
        while ended := [call for call in self._active.values() if call.ended(now)]:
            first = min(ended, key=lambda call: call.ends or now)
            del self._active[first.id]
            self._start_queued(first.ends or now)
        self._start_queued(now)  # lines a higher limit freed
        return len(self._active)

    def _start_queued(self, moment: datetime) -> None:
        while self._queue and len(self._active) < self._settings["concurrency_limit"]:
            call = self._queue.pop(0)
            self._start(call, max(moment, call.created))

    def _record(self, **kwargs: Any) -> RecordedRequest:
        record = RecordedRequest(seq=next(self._seq), **kwargs)
        self._requests.append(record)
        return record

    def _match_rule(self, body: dict[str, Any]) -> Rule | None:
        number, form_id = _customer_number_of(body), form_id_of(body)
        for rule in self._rules:
            if rule.matches(number, form_id):
                rule.hits += 1
                return rule
        return None

    def _next_outcome(self, number: str | None) -> str:
        script = self._settings["scripts"].get(number) if number else None
        if script:
            return script.pop(0)
        if self._settings["hold"]:
            return "hold"
        mix = self._settings["outcome_mix"]
        return self._mix_random.choices(list(mix), weights=list(mix.values()))[0]

    def _create(self, body: dict[str, Any], created: datetime) -> tuple[dict[str, Any], str]:
        """Create the call: started on a free line, or over the limit blocked (ended at once)
        or queued (behind the calls already waiting). Returns the answer and "placed",
        "blocked" or "queued"."""
        in_use = self._settle(created)
        limit = self._settings["concurrency_limit"]
        over = in_use >= limit or bool(self._queue)
        queue = over and self._settings["blocked_behaviour"] == "queue"
        data: dict[str, Any] = {
            "id": str(uuid.uuid4()),
            "orgId": self.org_id,
            "createdAt": iso(created),
            "updatedAt": iso(created),
            "type": "outboundPhoneCall",
            "status": "queued",
        }
        data.update({name: body[name] for name in _ECHOED_FIELDS if name in body})
        if over and not queue:
            data.update(status="ended", endedReason=CONCURRENCY_ENDED_REASON, endedAt=iso(created))
        call = _Call(
            seq=len(self._calls),
            data=data,
            created=created,
            blocked=over and not queue,
            queued=queue,
            form_ids=form_ids_of(body),
            generation=self._generation,
        )
        self._calls.append(call)
        self._calls_by_id[call.id] = call
        if not call.blocked:
            self._assign(call, self._next_outcome(_customer_number_of(body)), body)
            if queue:
                self._queue.append(call)
                self._ensure_keeper()
            else:
                self._start(call, created)
        in_use = len(self._active)
        limits = {
            "concurrencyBlocked": over,
            "concurrencyLimit": limit,
            "remainingConcurrentCalls": 0 if over else max(limit - in_use, 0),
        }
        # The answer is the call as created, before any timer moved it on.
        return (
            {**data, "subscriptionLimits": limits},
            "queued" if queue else "blocked" if over else "placed",
        )

    def _assign(self, call: _Call, outcome: str, body: dict[str, Any]) -> None:
        """Decide the call's fate and where it reports, when it is created (so the seeded
        draws follow the order of creation, queued or not)."""
        if outcome != "hold":
            call.outcome = outcome
            call.length = self._draw_length(outcome)
        overrides = body.get("assistantOverrides") or {}
        server = overrides.get("server")
        if not isinstance(server, dict) or not server.get("url"):
            return
        wanted = overrides.get("serverMessages")
        call.server = copy.deepcopy(server)
        call.message_types = frozenset(
            REPORTED_TYPES if wanted is None else set(wanted) & set(REPORTED_TYPES)
        )

    def _draw_length(self, outcome: str) -> float | None:
        spec = self._settings["durations"].get(outcome)
        if spec is None:
            return None
        if isinstance(spec, float):
            return spec
        if isinstance(spec, list):
            return self._duration_random.uniform(*spec)
        drawn = self._duration_random.lognormvariate(
            math.log(spec["lognormal_median"]), spec.get("sigma", DEFAULT_SIGMA)
        )
        return min(max(drawn, spec.get("min", 0.0)), spec.get("max", math.inf))

    def _start(self, call: _Call, at: datetime) -> None:
        """The call takes a line at `at`: it rings, is answered or not, and ends on its timeline."""
        scale = self._settings["time_scale"]
        ring = timedelta(seconds=self._settings["ring_seconds"] * scale)
        call.started = at
        if call.outcome is not None:
            if call.length is not None:
                length = timedelta(seconds=call.length * scale)
                call.ends = at + length
                if call.outcome in CONNECTED_OUTCOMES:
                    call.answered = at + min(ring, length)
            elif call.outcome in CONNECTED_OUTCOMES:
                call.answered = at + ring
                call.ends = call.answered + timedelta(
                    seconds=self._settings["call_duration"] * scale
                )
            else:
                call.ends = at + ring
        self._active[call.id] = call
        self._max_concurrent = max(self._max_concurrent, len(self._active))
        if call.message_types:
            self._submit(self._play(call))

    def _due_messages(self, call: _Call, now: datetime) -> list[dict[str, Any]]:
        """The messages of the phases the call has reached and not reported yet, in order:
        status-update ringing, in-progress (when answered), ended, then the end-of-call report
        (the report first with `reorder`)."""
        due: list[dict[str, Any]] = []
        if "ringing" not in call.reported:
            call.reported.add("ringing")
            due.append(_status_update(call, "ringing", call.started))
        if (
            call.answered is not None
            and call.connected()
            and now >= call.answered
            and "in-progress" not in call.reported
        ):
            call.reported.add("in-progress")
            due.append(_status_update(call, "in-progress", call.answered))
        if call.ended(now) and "ended" not in call.reported:
            call.reported.add("ended")
            ended, report = _status_update(call, "ended", call.ends), _end_of_call_report(call)
            due += [report, ended] if self._settings["reorder"] else [ended, report]
        return [m for m in due if m["message"]["type"] in call.message_types]

    # ---- the background loop: call timers and deliveries ------------------------------------

    def _submit(self, coroutine: Coroutine[Any, Any, None]) -> None:
        if self._loop is None or self._loop.is_closed():
            self._loop = asyncio.new_event_loop()
            self._loop_thread = threading.Thread(
                target=self._loop.run_forever, daemon=True, name="fake-vapi-calls"
            )
            self._loop_thread.start()
        task = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        self._tasks.add(task)
        task.add_done_callback(self._forget_task)

    def _forget_task(self, task: concurrent.futures.Future[None]) -> None:
        with self._lock:
            self._tasks.discard(task)

    def _ensure_keeper(self) -> None:
        """Under the lock: have a task start queued calls when their lines free."""
        if self._keeper != self._generation:
            self._keeper = self._generation
            self._submit(self._keep_lines(self._generation))

    def _wake_keeper(self) -> None:
        loop, wake = self._loop, self._keeper_wake
        if loop is not None and wake is not None and not loop.is_closed():
            loop.call_soon_threadsafe(wake.set)

    async def _keep_lines(self, generation: int) -> None:
        """While calls wait for a line: settle at each moment a call ends (or when woken by
        end_call or configure), so a queued call starts ringing and reporting when its line
        frees, even if nobody asks the fake anything."""
        self._keeper_wake = wake = asyncio.Event()
        while True:
            wake.clear()
            with self._lock:
                if generation != self._generation or not self._queue:
                    if self._keeper == generation:
                        self._keeper = None
                    return
                now = _now()
                self._settle(now)
                ends = [call.ends for call in self._active.values() if call.ends is not None]
            timeout = max((min(ends) - now).total_seconds(), 0) if ends else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout)

    async def _play(self, call: _Call) -> None:
        """Report each phase of the call when it is reached, until the end-of-call report."""
        while True:
            call.wake.clear()
            with self._lock:
                if call.generation != self._generation:
                    return
                now = _now()
                due = self._due_messages(call, now)
                finished = "ended" in call.reported
                moments = (
                    []
                    if finished
                    else [t for t in (call.answered, call.ends) if t is not None and t > now]
                )
            for message in due:
                await self._send(call, message)
            if finished:
                return
            timeout = (min(moments) - _now()).total_seconds() if moments else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    call.wake.wait(), None if timeout is None else max(timeout, 0)
                )

    async def _send(self, call: _Call, message: dict[str, Any]) -> None:
        with self._lock:
            drop_rate = self._settings["report_drop_rate"]
            duplicate_rate = self._settings["report_duplicate_rate"]
            dropped = bool(drop_rate) and self._fault_random.random() < drop_rate
            duplicated = bool(duplicate_rate) and self._fault_random.random() < duplicate_rate
        if dropped:
            self._record_delivery(call, message, attempt=1, answer=None, dropped=True)
            return
        for copy_number in range(2 if duplicated else 1):
            await self._deliver(call, message, duplicate=copy_number > 0)

    async def _deliver(self, call: _Call, message: dict[str, Any], *, duplicate: bool) -> None:
        """POST one message, retrying per the server's backoffPlan (none: a single attempt)."""
        assert call.server is not None
        server = call.server
        raw = json.dumps(message, separators=(",", ":")).encode()
        plan = server.get("backoffPlan") if isinstance(server.get("backoffPlan"), dict) else {}
        retries = int(plan.get("maxRetries", 0))
        excluded = set(plan.get("excludedStatusCodes") or ())
        timeout = float(server.get("timeoutSeconds", 20))
        if self._client is None:
            self._client = httpx.AsyncClient()
        for attempt in itertools.count(1):
            headers = {
                "content-type": "application/json",
                **{str(k): str(v) for k, v in (server.get("headers") or {}).items()},
            }
            with self._lock:
                secret = self._settings["credentials"].get(server.get("credentialId"))
                scale = self._settings["time_scale"]
            if secret is not None:
                # Signed per attempt, as Vapi does: the timestamp is the attempt's.
                timestamp = str(int(time.time() * 1000))
                headers.update(
                    {
                        "x-timestamp": timestamp,
                        "x-signature": hmac_signature(secret, timestamp, raw),
                    }
                )
            answer, error = None, None
            try:
                response = await self._client.post(
                    server["url"], content=raw, headers=headers, timeout=timeout
                )
                answer = response.status_code
            except httpx.HTTPError as exc:
                error = type(exc).__name__
            if not self._record_delivery(
                call,
                message,
                attempt=attempt,
                answer=answer,
                error=error,
                signed=secret is not None,
                duplicate=duplicate,
            ):
                return  # reset since: this call is gone
            if (
                (answer is not None and 200 <= answer < 300)
                or attempt > retries
                or answer in excluded
            ):
                return
            base = float(plan.get("baseDelaySeconds", 0))
            factor = 2 ** (attempt - 1) if plan.get("type") == "exponential" else 1
            await asyncio.sleep(base * factor * scale)

    def _record_delivery(
        self,
        call: _Call,
        message: dict[str, Any],
        *,
        attempt: int,
        answer: int | None,
        error: str | None = None,
        signed: bool = False,
        dropped: bool = False,
        duplicate: bool = False,
    ) -> bool:
        body = message["message"]
        with self._lock:
            if call.generation != self._generation:
                return False
            self._deliveries.append(
                Delivery(
                    seq=next(self._report_seq),
                    at=iso(_now()),
                    call_id=call.id,
                    type=body["type"],
                    status=body.get("status"),
                    ended_reason=body.get("endedReason"),
                    attempt=attempt,
                    answer=answer,
                    error=error,
                    signed=signed,
                    dropped=dropped,
                    duplicate=duplicate,
                )
            )
            return True

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(self.close)

    # ---- HTTP -------------------------------------------------------------------------------

    def _authorized(self, request: Request) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(token.strip(), self.api_key)

    async def _create_call(self, request: Request) -> Response | _DropConnection:
        created = _now()
        raw = await request.body()
        try:
            body: Any = json.loads(raw) if raw else {}
        except ValueError:
            body = None
        with self._lock:
            latency = self._settings["latency"]
            form_id = form_id_of(body)
            record = {"at": iso(created), "body": body, "form_id": form_id}
            if not self._authorized(request):
                self._record(outcome="rejected", status=401, reason="unauthorized", **record)
                response: Response | _DropConnection = _unauthorized()
            elif body is None:
                self._record(outcome="rejected", status=400, reason="invalid", **record)
                response = _json(error_body(400, "Unexpected token in JSON body"), 400)
            elif errors := validate_create_call(body):
                self._record(outcome="rejected", status=400, reason="invalid", **record)
                response = _json(error_body(400, errors), 400)
            elif (rule := self._match_rule(body)) and rule.status is not None and not rule.place:
                self._record(
                    outcome="rejected",
                    status=rule.status,
                    reason="injected",
                    rule_id=rule.id,
                    delay=rule.delay,
                    **record,
                )
                response = _injected(rule)
                latency += rule.delay
            else:
                call, outcome = self._create(body, created)
                injected = rule is not None and rule.status is not None
                dropped = bool(rule and rule.drop)
                delay = rule.delay if rule else 0.0
                status = rule.status if rule and injected else None if dropped else 201
                self._record(
                    outcome=outcome,
                    status=status,
                    reason="injected" if injected else None,
                    call_id=call["id"],
                    rule_id=rule.id if rule else None,
                    delay=delay,
                    dropped=dropped,
                    **record,
                )
                if rule is not None and injected:
                    response = _injected(rule)
                else:
                    response = _DropConnection() if dropped else _json(call, 201)
                latency += delay
        if latency:
            await asyncio.sleep(latency)
        return response

    async def _list_calls(self, request: Request) -> Response:
        if not self._authorized(request):
            return _unauthorized()
        query = request.query_params
        errors = [
            f"property {name} should not exist"
            for name in query
            if name not in {"id", "assistantId", "phoneNumberId", "limit", *_LIST_FILTERS}
        ]
        limit = 100
        if "limit" in query:
            try:
                limit = int(query["limit"])
            except ValueError:
                errors.append("limit must be a number conforming to the specified constraints")
            else:
                if limit > 1000:
                    errors.append("limit must not be greater than 1000")
                elif limit < 0:
                    errors.append("limit must not be less than 0")
        bounds: list[tuple[str, str, datetime]] = []
        for name, (attribute, op) in _LIST_FILTERS.items():
            if name in query:
                try:
                    bound = datetime.fromisoformat(query[name])
                except ValueError:
                    errors.append(f"{name} must be a valid ISO 8601 date string")
                    continue
                bounds.append((attribute, op, bound if bound.tzinfo else bound.replace(tzinfo=UTC)))
        if errors:
            return _json(error_body(400, errors), 400)
        now = _now()
        with self._lock:
            self._settle(now)
            matches = [
                call.view(now)
                for call in reversed(self._calls)
                if all(
                    call.data.get(name) == query[name]
                    for name in ("id", "assistantId", "phoneNumberId")
                    if name in query
                )
                and all(
                    _compare(
                        call.created if attribute == "createdAt" else call.updated(now), op, bound
                    )
                    for attribute, op, bound in bounds
                )
            ]
        return _json(matches[:limit])

    async def _get_call(self, request: Request) -> Response:
        if not self._authorized(request):
            return _unauthorized()
        call_id = request.path_params["call_id"]
        try:
            uuid.UUID(call_id)
        except ValueError:
            return _json(error_body(400, "Validation failed (uuid is expected)"), 400)
        call = self.get_call(call_id)
        if call is None:
            return _json(error_body(404, "Call not found"), 404)
        return _json(call)

    async def _admin_requests(self, request: Request) -> Response:
        if not self._authorized(request):
            return _unauthorized()
        form_id = request.query_params.get("formId")
        return _json(
            [r.to_json() for r in self.requests if form_id is None or r.form_id == form_id]
        )

    async def _admin_calls(self, request: Request) -> Response:
        if not self._authorized(request):
            return _unauthorized()
        form_id = request.query_params.get("formId")
        return _json(self.placed_calls() if form_id is None else self.calls_for_form(form_id))

    async def _admin_end_call(self, request: Request) -> Response:
        if not self._authorized(request):
            return _unauthorized()
        try:
            payload = await request.json()
        except ValueError:
            payload = None
        outcome = payload.get("outcome") if isinstance(payload, dict) else None
        try:
            return _json(self.end_call(request.path_params["call_id"], outcome))
        except KeyError:
            return _json(error_body(404, "Call not found"), 404)
        except ValueError as error:
            return _json(error_body(400, [str(error)]), 400)
        except CallAlreadyEnded:
            return _json(error_body(409, "Call has already ended"), 409)

    async def _admin_reports(self, request: Request) -> Response:
        if not self._authorized(request):
            return _unauthorized()
        return _json([d.to_json() for d in self.reports(request.query_params.get("callId"))])

    async def _admin_lines(self, request: Request) -> Response:
        if not self._authorized(request):
            return _unauthorized()
        return _json(self.line_stats())

    async def _admin_stats(self, request: Request) -> Response:
        if not self._authorized(request):
            return _unauthorized()
        return _json(self.stats())

    async def _admin_reset(self, request: Request) -> Response:
        if not self._authorized(request):
            return _unauthorized()
        self.reset()
        return _json(self.stats())

    async def _admin_configure(self, request: Request) -> Response:
        if not self._authorized(request):
            return _unauthorized()
        try:
            settings = await request.json()
            if not isinstance(settings, dict) or not set(settings) <= set(SETTINGS):
                raise ValueError(
                    f"settings must be an object with keys among {', '.join(sorted(SETTINGS))}"
                )
            self.configure(**settings)
        except ValueError as error:
            return _json(error_body(400, [str(error)]), 400)
        return _json(self.stats())

    async def _admin_rules(self, request: Request) -> Response:
        if not self._authorized(request):
            return _unauthorized()
        if request.method == "DELETE":
            self.clear_rules()
        elif request.method == "POST":
            try:
                rule = Rule.from_json(await request.json())
            except (ValueError, TypeError) as error:
                return _json(error_body(400, [str(error)]), 400)
            with self._lock:
                self._rules.append(rule)
            return _json(rule.to_json(), 201)
        return _json(self.rules())


def _status_update(call: _Call, status: str, at: datetime | None) -> dict[str, Any]:
    assert at is not None
    view = call.view(at, status)
    message: dict[str, Any] = {"type": "status-update", "status": status}
    if status == "ended":
        message["endedReason"] = view["endedReason"]
    return {"message": {**message, "timestamp": _epoch_ms(at), **_about(call, view)}}


def _end_of_call_report(call: _Call) -> dict[str, Any]:
    assert call.ends is not None and call.outcome is not None
    view = call.view(call.ends, "ended")
    message = {
        "type": "end-of-call-report",
        "endedReason": view["endedReason"],
        "timestamp": _epoch_ms(call.ends),
        "endedAt": view["endedAt"],
        "cost": view["cost"],
        "artifact": _artifact(call.outcome),
        "analysis": view["analysis"],
    }
    if "startedAt" in view:
        message["startedAt"] = view["startedAt"]
    return {"message": {**message, **_about(call, view)}}


def _about(call: _Call, view: dict[str, Any]) -> dict[str, Any]:
    """The parts of a server message that say which call it is about."""
    about: dict[str, Any] = {"call": view}
    if isinstance(call.data.get("customer"), dict):
        about["customer"] = call.data["customer"]
    return about


def _epoch_ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def _checked_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings, validated and normalised; ValueError names the first bad one."""
    out: dict[str, Any] = {}
    for name, value in settings.items():
        if name not in SETTINGS:
            raise ValueError(f"unknown setting {name}")
        if name in ("hold", "reorder"):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false")
            out[name] = value
        elif name == "seed":
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError("seed must be an integer")
            out[name] = value
        elif name == "outcome_mix":
            out[name] = _checked_mix(value)
        elif name == "durations":
            out[name] = _checked_durations(value)
        elif name == "blocked_behaviour":
            if value not in BLOCKED_BEHAVIOURS:
                raise ValueError(
                    "blocked_behaviour must be one of " + ", ".join(BLOCKED_BEHAVIOURS)
                )
            out[name] = value
        elif name == "scripts":
            if not isinstance(value, dict) or not all(
                isinstance(number, str)
                and isinstance(script, list)
                and all(outcome in PLAY_OUTCOMES for outcome in script)
                for number, script in value.items()
            ):
                raise ValueError(
                    "scripts must map numbers to lists of outcomes among "
                    f"{', '.join(PLAY_OUTCOMES)}"
                )
            out[name] = {number: list(script) for number, script in value.items()}
        elif name == "credentials":
            if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and v for k, v in value.items()
            ):
                raise ValueError("credentials must map credential ids to HMAC secrets")
            out[name] = dict(value)
        else:
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{name} must be a number >= 0")
            if name == "concurrency_limit":
                if not float(value).is_integer():
                    raise ValueError("concurrency_limit must be an integer")
                value = int(value)
            elif name.endswith("_rate") and value > 1:
                raise ValueError(f"{name} must be between 0 and 1")
            out[name] = value if name == "concurrency_limit" else float(value)
    return out


def _checked_mix(mix: Any) -> dict[str, float]:
    if (
        not isinstance(mix, dict)
        or not mix
        or not all(
            outcome in PLAY_OUTCOMES
            and not isinstance(weight, bool)
            and isinstance(weight, int | float)
            and weight >= 0
            for outcome, weight in mix.items()
        )
        or sum(mix.values()) <= 0
    ):
        raise ValueError(
            "outcome_mix must map outcomes among "
            f"{', '.join(PLAY_OUTCOMES)} to weights >= 0, not all 0"
        )
    return {outcome: float(weight) for outcome, weight in mix.items()}


def _checked_durations(durations: Any) -> dict[str, Any]:
    """{outcome: seconds}: a number, `[low, high]` (uniform) or a lognormal with its median."""
    problem = ValueError(
        "durations must map outcomes among " + ", ".join(END_OUTCOMES) + " to a number of"
        ' seconds >= 0, [low, high] with 0 <= low <= high, or {"lognormal_median": m > 0,'
        ' "sigma": s >= 0, "min": a, "max": b} with a <= b'
    )
    if not isinstance(durations, dict):
        raise problem
    out: dict[str, Any] = {}
    for outcome, spec in durations.items():
        if outcome not in END_OUTCOMES:
            raise problem
        if _is_number(spec) and spec >= 0:
            out[outcome] = float(spec)
        elif (
            isinstance(spec, list)
            and len(spec) == 2
            and all(map(_is_number, spec))
            and 0 <= spec[0] <= spec[1]
        ):
            out[outcome] = [float(spec[0]), float(spec[1])]
        elif (
            isinstance(spec, dict)
            and set(spec) <= {"lognormal_median", "sigma", "min", "max"}
            and all(map(_is_number, spec.values()))
            and spec.get("lognormal_median", 0) > 0
            and spec.get("sigma", 0) >= 0
            and 0 <= spec.get("min", 0) <= spec.get("max", math.inf)
        ):
            out[outcome] = {name: float(value) for name, value in spec.items()}
        else:
            raise problem
    return out


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def line_series(calls: list[dict[str, Any]], *, until: float) -> list[list[float]]:
    """Lines in use over time, [moment, in use from then on], from calls' started and ended
    moments (line_stats' `calls`) up to `until`; a line freed and taken at the same moment
    is never counted twice."""
    events = [(c["started"], 1) for c in calls if c["started"] is not None]
    events += [
        (c["ended"], -1)
        for c in calls
        if c["started"] is not None and c["ended"] is not None and c["ended"] <= until
    ]
    series, level = [], 0
    for moment, change in sorted(events):
        level += change
        series.append([moment, level])
    return series


def _compare(value: datetime, op: str, bound: datetime) -> bool:
    return {"Gt": value > bound, "Lt": value < bound, "Ge": value >= bound, "Le": value <= bound}[
        op
    ]


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(payload, status_code=status, headers=headers)


def _injected(rule: Rule) -> Response:
    assert rule.status is not None
    payload = rule.body if rule.body is not None else error_body(rule.status)
    return _json(payload, rule.status, rule.headers)


def _unauthorized() -> Response:
    return _json(error_body(401, INVALID_KEY_MESSAGE), 401)
