"""A fake Vapi call API for tests and the dev stack: wire format, line limit, injected faults."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import secrets
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

CONCURRENCY_ENDED_REASON = "call.start.error-subscription-concurrency-limit-reached"
COMPLETED_ENDED_REASON = "customer-ended-call"
INVALID_KEY_MESSAGE = (
    "Invalid Key. Hot tip, you may be using the private key instead of the public key, "
    "or vice versa."
)

# The top-level properties of Vapi's CreateCallDTO; NestJS rejects any other one.
CREATE_CALL_FIELDS = frozenset({
    "assistantId", "assistant", "assistantOverrides", "squadId", "squad", "workflowId",
    "workflow", "phoneNumberId", "phoneNumber", "customer", "customerId", "customers", "name",
    "schedulePlan", "assistantVersion", "transport",
})
CUSTOMER_FIELDS = frozenset({
    "number", "name", "email", "externalId", "extension", "sipUri", "assistantOverrides",
    "squadOverrides", "numberE164CheckEnabled",
})
_STRING_FIELDS = ("assistantId", "squadId", "workflowId", "phoneNumberId", "customerId", "name",
                  "assistantVersion")
_OBJECT_FIELDS = ("assistant", "assistantOverrides", "squad", "workflow", "phoneNumber",
                  "customer", "schedulePlan", "transport")
# Fields of the request that the Call resource carries back.
_ECHOED_FIELDS = ("assistantId", "assistant", "assistantOverrides", "squadId", "squad",
                  "workflowId", "workflow", "phoneNumberId", "phoneNumber", "customer",
                  "customerId", "name", "schedulePlan", "transport")
_E164 = re.compile(r"^\+[1-9]\d{1,14}$")
_ALPHANUMERIC_NUMBER = re.compile(r"^\+?[a-zA-Z0-9]+$")
_LIST_FILTERS = {f"{f}{op}": (f, op) for f in ("createdAt", "updatedAt")
                 for op in ("Gt", "Lt", "Ge", "Le")}
_TRANSPORT_KEY = "formcall_dev.fake_vapi.transport"


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


def validate_create_call(body: Any) -> list[str]:
    """The messages Vapi's validation would answer a create-call body with; empty when valid."""
    if not isinstance(body, dict):
        return ["body must be an object"]
    errors = [f"property {name} should not exist"
              for name in body if name not in CREATE_CALL_FIELDS]
    errors += [f"{name} must be a string" for name in _STRING_FIELDS
               if name in body and not isinstance(body[name], str)]
    errors += [f"{name} must be an object" for name in _OBJECT_FIELDS
               if name in body and not isinstance(body[name], dict)]
    if not any(body.get(name) for name in ("assistantId", "assistant", "squadId", "squad",
                                           "workflowId", "workflow")):
        errors.append("assistantId or assistant (or squadId, squad, workflowId, workflow) "
                      "must be provided")
    if not (body.get("phoneNumberId") or body.get("phoneNumber")):
        errors.append("phoneNumberId or phoneNumber must be provided")
    if "customers" in body:
        errors.append("fake-vapi does not model batch calls: use customer, not customers")
    elif not (body.get("customer") or body.get("customerId")):
        errors.append("customer or customerId must be provided")
    if isinstance(body.get("name"), str) and len(body["name"]) > 40:
        errors.append("name must be shorter than or equal to 40 characters")
    if isinstance(body.get("customer"), dict):
        errors += _validate_customer(body["customer"])
    return errors


def _validate_customer(customer: dict[str, Any]) -> list[str]:
    # class-validator prefixes nested messages with the parent path, even "property X ...".
    errors = [f"customer.property {name} should not exist"
              for name in customer if name not in CUSTOMER_FIELDS]
    for name, limit in (("name", 40), ("email", 40), ("externalId", 40), ("extension", 10)):
        value = customer.get(name)
        if name in customer and not isinstance(value, str):
            errors.append(f"customer.{name} must be a string")
        elif isinstance(value, str) and len(value) > limit:
            errors.append(f"customer.{name} must be shorter than or equal to {limit} characters")
    if "number" in customer:
        number = customer["number"]
        if not isinstance(number, str):
            errors.append("customer.number must be a string")
        elif customer.get("numberE164CheckEnabled", True) is not False:
            if not _E164.match(number):
                errors.append("customer.number must be a valid phone number in the E.164 format. "
                              "Hot tip, you may be missing the country code (Eg. US: +1).")
        elif not (3 <= len(number) <= 40 and _ALPHANUMERIC_NUMBER.match(number)):
            errors.append("customer.number must be 3 to 40 alphanumeric characters, "
                          "optionally starting with +")
    return errors


def form_id_of(body: Any) -> str | None:
    """The formId formcall puts in `assistantOverrides.metadata`, if the body has one."""
    overrides = body.get("assistantOverrides") if isinstance(body, dict) else None
    metadata = overrides.get("metadata") if isinstance(overrides, dict) else None
    value = metadata.get("formId") if isinstance(metadata, dict) else None
    return value if isinstance(value, str) else None


def _customer_number_of(body: Any) -> str | None:
    customer = body.get("customer") if isinstance(body, dict) else None
    number = customer.get("number") if isinstance(customer, dict) else None
    return number if isinstance(number, str) else None


@dataclass
class Rule:
    """A fault to inject into create-call requests that match it.

    Matches on `customer_number` and/or `form_id` (neither: every request), for `times`
    requests (None: unlimited). With `status`, answer that status and `body` (default: a
    Vapi-shaped error) without placing a call. Otherwise the call is placed, then the answer
    waits `delay` seconds and, with `drop`, the connection is closed without a response.
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
    hits: int = 0

    def __post_init__(self) -> None:
        if self.status is not None and not 100 <= self.status <= 599:
            raise ValueError("status must be an HTTP status code")
        if self.status is not None and self.drop:
            raise ValueError("a rule either answers a status or drops the connection, not both")
        if self.status is None and not self.drop and not self.delay:
            raise ValueError("a rule needs a status, a delay or drop")
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
        return ((self.times is None or self.hits < self.times)
                and self.customer_number in (None, customer_number)
                and self.form_id in (None, form_id))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RecordedRequest:
    """One create-call request and what the fake did with it.

    outcome: "placed" (a line was taken; also when the answer was delayed or dropped),
    "blocked" (created but over the concurrency limit) or "rejected" (no call; `reason` is
    "unauthorized", "invalid" or "injected").
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
class _Call:
    seq: int
    data: dict[str, Any]
    created: datetime
    ends: datetime
    blocked: bool
    form_id: str | None

    def view(self, now: datetime) -> dict[str, Any]:
        """The Call resource as a later GET sees it: in progress for its duration, then ended."""
        data = dict(self.data)
        if self.blocked:
            return data
        data["startedAt"] = data["createdAt"]
        if now >= self.ends:
            data.update(status="ended", endedReason=COMPLETED_ENDED_REASON,
                        endedAt=iso(self.ends), updatedAt=iso(self.ends))
        else:
            data["status"] = "in-progress"
        return data

    def updated(self, now: datetime) -> datetime:
        return self.ends if not self.blocked and now >= self.ends else self.created


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
        await send({"type": "http.response.start", "status": 201,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", b"4096")]})


class _App(Starlette):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # uvicorn passes its request cycle's bound `send`; its transport is what a drop closes.
        if scope["type"] == "http":
            scope[_TRANSPORT_KEY] = getattr(getattr(send, "__self__", None), "transport", None)
        await super().__call__(scope, receive, send)


class FakeVapi:
    """Vapi's call API in memory; one lock guards the state, so any thread may read it.

    Python API: configure, add_rule, clear_rules, rules, requests, placed_calls, calls_for_form,
    get_call, max_concurrent, lines_in_use, stats, reset. The same over HTTP (bearer key needed):
    GET /_fake/requests[?formId=], GET /_fake/calls[?formId=], GET /_fake/stats,
    POST /_fake/reset, POST /_fake/configure, GET|POST|DELETE /_fake/rules.
    """

    def __init__(self, *, api_key: str, concurrency_limit: int = 10, call_duration: float = 0.0,
                 latency: float = 0.0) -> None:
        self.api_key = api_key
        self.org_id = str(uuid.uuid4())
        self._defaults = {"concurrency_limit": concurrency_limit, "call_duration": call_duration,
                          "latency": latency}
        self._lock = threading.Lock()
        self._seq = itertools.count(1)
        self.reset()
        self.app = _App(routes=[
            Route("/call", self._create_call, methods=["POST"]),
            Route("/call", self._list_calls, methods=["GET"]),
            Route("/call/{call_id}", self._get_call, methods=["GET"]),
            Route("/_fake/requests", self._admin_requests, methods=["GET"]),
            Route("/_fake/calls", self._admin_calls, methods=["GET"]),
            Route("/_fake/stats", self._admin_stats, methods=["GET"]),
            Route("/_fake/reset", self._admin_reset, methods=["POST"]),
            Route("/_fake/configure", self._admin_configure, methods=["POST"]),
            Route("/_fake/rules", self._admin_rules, methods=["GET", "POST", "DELETE"]),
        ])

    # ---- Python API -------------------------------------------------------------------------

    def configure(self, *, concurrency_limit: int | None = None, call_duration: float | None = None,
                  latency: float | None = None) -> None:
        """Change settings for the calls that come next; None leaves a setting as it is."""
        for name, value in (("concurrency_limit", concurrency_limit),
                            ("call_duration", call_duration), ("latency", latency)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                      or value < 0):
                raise ValueError(f"{name} must be a number >= 0")
        if concurrency_limit is not None and not float(concurrency_limit).is_integer():
            raise ValueError("concurrency_limit must be an integer")
        with self._lock:
            if concurrency_limit is not None:
                self._concurrency_limit = int(concurrency_limit)
            if call_duration is not None:
                self._call_duration = float(call_duration)
            if latency is not None:
                self._latency = float(latency)

    def add_rule(self, *, customer_number: str | None = None, form_id: str | None = None,
                 times: int | None = None, status: int | None = None, body: Any = None,
                 headers: dict[str, str] | None = None, delay: float = 0.0,
                 drop: bool = False) -> str:
        """Add a fault rule (see `Rule`); rules are tried in the order added. Returns its id."""
        rule = Rule(customer_number=customer_number, form_id=form_id, times=times, status=status,
                    body=body, headers=headers, delay=delay, drop=drop)
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
        """Calls that took a line, oldest first, as GET /call/{id} would show them now."""
        now = _now()
        with self._lock:
            return [call.view(now) for call in self._calls if not call.blocked]

    def calls_for_form(self, form_id: str) -> list[dict[str, Any]]:
        return [call for call in self.placed_calls() if form_id_of(call) == form_id]

    def get_call(self, call_id: str) -> dict[str, Any] | None:
        with self._lock:
            call = self._calls_by_id.get(call_id)
        return call.view(_now()) if call else None

    @property
    def max_concurrent(self) -> int:
        with self._lock:
            return self._max_concurrent

    def lines_in_use(self) -> int:
        with self._lock:
            return self._lines_in_use(time.monotonic())

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": len(self._requests),
                "placed": self._count("outcome", "placed"),
                "blocked": self._count("outcome", "blocked"),
                "rejected": self._count("outcome", "rejected"),
                "unauthorized": self._count("reason", "unauthorized"),
                "invalid": self._count("reason", "invalid"),
                "injected": self._count("reason", "injected"),
                "dropped": sum(r.dropped for r in self._requests),
                "lines_in_use": self._lines_in_use(time.monotonic()),
                "max_concurrent": self._max_concurrent,
                "concurrency_limit": self._concurrency_limit,
                "call_duration": self._call_duration,
                "latency": self._latency,
                "rules": len(self._rules),
            }

    def reset(self) -> None:
        """Forget requests, calls and rules, and go back to the constructor's settings."""
        with self._lock:
            self._concurrency_limit = int(self._defaults["concurrency_limit"])
            self._call_duration = float(self._defaults["call_duration"])
            self._latency = float(self._defaults["latency"])
            self._rules: list[Rule] = []
            self._requests: list[RecordedRequest] = []
            self._calls: list[_Call] = []
            self._calls_by_id: dict[str, _Call] = {}
            self._line_ends: list[float] = []
            self._max_concurrent = 0

    # ---- state changes, under the lock ------------------------------------------------------

    def _count(self, attribute: str, value: str) -> int:
        return sum(getattr(r, attribute) == value for r in self._requests)

    def _lines_in_use(self, now: float) -> int:
        self._line_ends = [end for end in self._line_ends if end > now]
        return len(self._line_ends)

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

    def _create(self, body: dict[str, Any], created: datetime) -> tuple[dict[str, Any], bool]:
        """Create the call, placed on a free line or blocked by the concurrency limit."""
        now = time.monotonic()
        in_use = self._lines_in_use(now)
        limit = self._concurrency_limit
        blocked = in_use >= limit
        if not blocked:
            self._line_ends.append(now + self._call_duration)
            in_use += 1
            self._max_concurrent = max(self._max_concurrent, in_use)
        data: dict[str, Any] = {
            "id": str(uuid.uuid4()),
            "orgId": self.org_id,
            "createdAt": iso(created),
            "updatedAt": iso(created),
            "type": "outboundPhoneCall",
            "status": "queued",
        }
        data.update({name: body[name] for name in _ECHOED_FIELDS if name in body})
        if blocked:
            data.update(status="ended", endedReason=CONCURRENCY_ENDED_REASON,
                        endedAt=iso(created))
        ends = created + timedelta(seconds=0 if blocked else self._call_duration)
        call = _Call(seq=len(self._calls), data=data, created=created, ends=ends,
                     blocked=blocked, form_id=form_id_of(body))
        self._calls.append(call)
        self._calls_by_id[data["id"]] = call
        limits = {"concurrencyBlocked": blocked, "concurrencyLimit": limit,
                  "remainingConcurrentCalls": 0 if blocked else max(limit - in_use, 0)}
        return {**data, "subscriptionLimits": limits}, blocked

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
            latency = self._latency
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
            elif (rule := self._match_rule(body)) and rule.status is not None:
                self._record(outcome="rejected", status=rule.status, reason="injected",
                             rule_id=rule.id, delay=rule.delay, **record)
                payload = rule.body if rule.body is not None else error_body(rule.status)
                response = _json(payload, rule.status, rule.headers)
                latency += rule.delay
            else:
                call, blocked = self._create(body, created)
                dropped = bool(rule and rule.drop)
                delay = rule.delay if rule else 0.0
                self._record(outcome="blocked" if blocked else "placed",
                             status=None if dropped else 201, call_id=call["id"],
                             rule_id=rule.id if rule else None, delay=delay, dropped=dropped,
                             **record)
                response = _DropConnection() if dropped else _json(call, 201)
                latency += delay
        if latency:
            await asyncio.sleep(latency)
        return response

    async def _list_calls(self, request: Request) -> Response:
        if not self._authorized(request):
            return _unauthorized()
        query = request.query_params
        errors = [f"property {name} should not exist" for name in query
                  if name not in {"id", "assistantId", "phoneNumberId", "limit", *_LIST_FILTERS}]
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
            calls = list(self._calls)
        matches = [
            call.view(now) for call in reversed(calls)
            if all(call.data.get(name) == query[name]
                   for name in ("id", "assistantId", "phoneNumberId") if name in query)
            and all(_compare(call.created if attribute == "createdAt" else call.updated(now),
                             op, bound) for attribute, op, bound in bounds)
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
        return _json([r.to_json() for r in self.requests
                      if form_id is None or r.form_id == form_id])

    async def _admin_calls(self, request: Request) -> Response:
        if not self._authorized(request):
            return _unauthorized()
        form_id = request.query_params.get("formId")
        return _json(self.placed_calls() if form_id is None else self.calls_for_form(form_id))

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
            if not isinstance(settings, dict) or not set(settings) <= set(self._defaults):
                raise ValueError(f"settings must be an object with keys among "
                                 f"{', '.join(sorted(self._defaults))}")
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


def _compare(value: datetime, op: str, bound: datetime) -> bool:
    return {"Gt": value > bound, "Lt": value < bound, "Ge": value >= bound,
            "Le": value <= bound}[op]


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(payload, status_code=status, headers=headers)


def _unauthorized() -> Response:
    return _json(error_body(401, INVALID_KEY_MESSAGE), 401)
