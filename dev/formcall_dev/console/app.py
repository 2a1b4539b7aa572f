"""The console's Starlette app: pages, their live fragments and the Act buttons; thin handlers."""

from __future__ import annotations

import urllib.parse
import uuid
from collections.abc import Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import psycopg
from psycopg import AsyncConnection
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Receive, Scope, Send

from formcall_dev.console import actions, queries, views
from formcall_dev.console.journey import parse_time
from formcall_dev.console.upstream import (
    PLAY_OUTCOMES,
    FakeVapiAdmin,
    LocalQStash,
    Refused,
    Unavailable,
    trigger_sweep,
)

HERE = Path(__file__).parent
LOCAL_HOSTS = ("127.0.0.1", "localhost")
MAX_FORM_BYTES = 16 * 1024


@dataclass(frozen=True)
class ConsoleConfig:
    """Where the stack's parts are; `vapi_url` is None when the stack uses the real Vapi."""

    dsn: str
    qstash_url: str
    qstash_token: str
    check_forms_url: str
    cron_secret: str
    vapi_url: str | None
    vapi_key: str
    # How often a page refreshes its live parts: a new form shows within about this long.
    refresh_ms: int = 500

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ConsoleConfig:
        """The settings the dev stack gives its components (stack.py)."""
        return cls(
            dsn=env["FORMCALL_DEV_DSN"],
            qstash_url=env["QSTASH_URL"],
            qstash_token=env["QSTASH_TOKEN"],
            check_forms_url=env["CHECK_FORMS_URL"],
            cron_secret=env["CRON_SECRET"],
            vapi_url=None if env.get("FORMCALL_DEV_REAL_VAPI") else env["VAPI_BASE_URL"],
            vapi_key=env["VAPI_PRIVATE_KEY"],
        )


class LocalOnly:
    """Refuse what a web page elsewhere could send: other host names and cross-site POSTs.

    The console binds 127.0.0.1 and has no login; the Host check stops DNS rebinding, the
    Origin check stops another site's form from submitting to it.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            host = urllib.parse.urlsplit("//" + headers.get("host", "")).hostname
            origin = headers.get("origin")
            if host not in LOCAL_HOSTS:
                response: Response = PlainTextResponse(
                    "the console answers on 127.0.0.1 only", status_code=400
                )
                return await response(scope, receive, send)
            if scope["method"] not in ("GET", "HEAD") and (
                headers.get("sec-fetch-site") == "cross-site"
                or (
                    origin is not None and urllib.parse.urlsplit(origin).hostname not in LOCAL_HOSTS
                )
            ):
                response = PlainTextResponse("cross-site request refused", status_code=403)
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


# --- template helpers


def _time(value: Any, precise: bool = False) -> str:
    moment = parse_time(value)
    if moment is None:
        return ""
    text = (
        moment.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        if precise
        else moment.strftime("%Y-%m-%d %H:%M:%S")
    )
    return text + " UTC"


def _local(value: Any, zone: str) -> str:
    """The time in the patient's own zone (what the calling window is judged by)."""
    moment = parse_time(value)
    if moment is None:
        return ""
    try:
        return moment.astimezone(ZoneInfo(zone)).strftime("%H:%M:%S %Z")
    except (ValueError, KeyError):
        return ""


def _short(value: str | None) -> str:
    """Enough of an id to tell rows apart: a UUID's first group, 8 characters after msg_."""
    value = value or ""
    return value[:12] if value.startswith("msg_") else value[:8]


def _templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.filters["time"] = _time
    templates.env.filters["local"] = _local
    templates.env.filters["short"] = _short
    return templates


# --- the app


def create_app(config: ConsoleConfig) -> Starlette:
    templates = _templates()
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: Starlette):
        async with httpx.AsyncClient(timeout=10) as http:
            state["http"] = http
            state["qstash"] = LocalQStash(http, url=config.qstash_url, token=config.qstash_token)
            state["vapi"] = (
                FakeVapiAdmin(http, url=config.vapi_url, key=config.vapi_key)
                if config.vapi_url
                else None
            )
            yield

    def db() -> Any:
        return AsyncConnection.connect(config.dsn, autocommit=True, connect_timeout=5)

    def render(request: Request, name: str, context: dict, status: int = 200) -> Response:
        return templates.TemplateResponse(
            request, name, {"refresh_ms": config.refresh_ms, **context}, status_code=status
        )

    # --- pages, and the live fragments they refresh themselves from

    async def forms(request: Request, template: str) -> Response:
        async with await db() as conn:
            view = await views.forms_view(
                conn,
                state["qstash"],
                status=request.query_params.get("status") or None,
                outcome=request.query_params.get("outcome") or None,
            )
        return render(request, template, view)

    async def form_journey(request: Request, template: str) -> Response:
        form_id = _form_id(request)
        async with await db() as conn:
            view = await views.journey_view(conn, state["qstash"], state["vapi"], form_id)
        return render(request, template, view)

    async def qstash(request: Request, template: str) -> Response:
        return render(request, template, await views.qstash_view(state["qstash"]))

    async def act_page(request: Request) -> Response:
        async with await db() as conn:
            pending = await queries.pending_forms(conn)
        return render(
            request, "act.html", {"pending": pending, **await views.calls_view(state["vapi"])}
        )

    async def act_calls(request: Request) -> Response:
        return render(request, "_calls.html", await views.calls_view(state["vapi"]))

    # --- buttons: each answers 303 back to its page with a notice

    async def dlq_retry(request: Request) -> Response:
        fields = await _fields(request)
        message_id = await state["qstash"].retry_dlq(_dlq_id(request))
        return _back(fields, "/qstash", f"published again as message {message_id}")

    async def dlq_delete(request: Request) -> Response:
        fields = await _fields(request)
        await state["qstash"].delete_dlq(_dlq_id(request))
        return _back(fields, "/qstash", "deleted from the DLQ")

    async def hold_calls(request: Request) -> Response:
        fields = await _fields(request)
        if fields.get("hold") not in ("on", "off"):
            raise actions.InvalidInput("hold must be on or off")
        if state["vapi"] is None:
            raise actions.Conflict("the stack uses the real Vapi: its calls cannot be held")
        await state["vapi"].hold(fields["hold"] == "on")
        return _back(
            fields,
            "/act",
            "new calls now ring until you play the patient"
            if fields["hold"] == "on"
            else "new calls now end by themselves",
        )

    async def create_form(request: Request) -> Response:
        new = actions.NewForm.parse(await _fields(request))
        async with await db() as conn:
            form_id = await actions.create_test_form(conn, new)
        return RedirectResponse(
            f"/forms/{form_id}?notice="
            + urllib.parse.quote(f"created a form due in {new.due_in_seconds} s"),
            status_code=303,
        )

    async def submit_form(request: Request) -> Response:
        fields, form_id = await _fields(request), _form_id(request)
        async with await db() as conn:
            await actions.submit_form(conn, form_id)
        return _back(fields, f"/forms/{form_id}", "submitted")

    async def move_deadline(request: Request) -> Response:
        fields, form_id = await _fields(request), _form_id(request)
        seconds = actions.parse_due_seconds(fields.get("due_in_seconds", ""))
        async with await db() as conn:
            await actions.move_deadline(conn, form_id, seconds)
        return _back(fields, f"/forms/{form_id}", f"deadline moved to {seconds} s from now")

    async def sweep(request: Request) -> Response:
        fields = await _fields(request)
        answer = await trigger_sweep(
            state["http"], url=config.check_forms_url, cron_secret=config.cron_secret
        )
        summary = ", ".join(f"{k} {answer.get(k)}" for k in ("found", "enqueued", "failed"))
        return _back(fields, "/act", f"sweep ran: {summary}")

    async def end_call(request: Request) -> Response:
        fields = await _fields(request)
        outcome = fields.get("outcome", "")
        if outcome not in PLAY_OUTCOMES:
            raise actions.InvalidInput(f"outcome must be one of {', '.join(PLAY_OUTCOMES)}")
        if state["vapi"] is None:
            raise actions.Conflict("the stack uses the real Vapi: its calls cannot be played")
        call_id = request.path_params["call_id"]
        if not _is_uuid(call_id):
            raise actions.InvalidInput("not a call id")
        await state["vapi"].end_call(call_id, outcome)
        return _back(fields, "/act", f"call {call_id[:8]} ended: {outcome.replace('_', ' ')}")

    # --- errors: the one place that maps them to statuses

    def error_page(status: int):
        async def handle(request: Request, exc: Exception) -> Response:
            message = (
                str(exc)
                if not isinstance(exc, psycopg.OperationalError)
                else "the database is not reachable"
            )
            return render(
                request, "error.html", {"status": status, "message": message}, status=status
            )

        return handle

    async def refused(request: Request, exc: Exception) -> Response:
        status = exc.status if isinstance(exc, Refused) and exc.status in (404, 409) else 409
        return await error_page(status)(request, exc)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return await error_page(exc.status_code)(request, Exception(exc.detail))

    routes = [
        Route("/", lambda request: RedirectResponse("/forms", status_code=303)),
        Route("/forms", page(forms, "forms.html")),
        Route("/forms/rows", page(forms, "_forms_rows.html")),
        Route("/forms/{form_id}", page(form_journey, "journey.html")),
        Route("/forms/{form_id}/timeline", page(form_journey, "_journey.html")),
        Route("/forms/{form_id}/submit", submit_form, methods=["POST"]),
        Route("/forms/{form_id}/deadline", move_deadline, methods=["POST"]),
        Route("/qstash", page(qstash, "qstash.html")),
        Route("/qstash/panel", page(qstash, "_qstash.html")),
        Route("/qstash/dlq/{dlq_id}/retry", dlq_retry, methods=["POST"]),
        Route("/qstash/dlq/{dlq_id}/delete", dlq_delete, methods=["POST"]),
        Route("/act", act_page),
        Route("/act/calls", act_calls),
        Route("/act/forms", create_form, methods=["POST"]),
        Route("/act/sweep", sweep, methods=["POST"]),
        Route("/act/calls/{call_id}/end", end_call, methods=["POST"]),
        Route("/act/hold", hold_calls, methods=["POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            actions.InvalidInput: error_page(400),
            actions.NotFound: error_page(404),
            actions.Conflict: error_page(409),
            Refused: refused,
            Unavailable: error_page(503),
            psycopg.OperationalError: error_page(503),
            HTTPException: http_error,
        },
    )
    app.add_middleware(LocalOnly)
    return app


def page(handler, template: str):
    """A route for a whole page or its live fragment: the same view, another template."""

    async def endpoint(request: Request) -> Response:
        return await handler(request, template)

    return endpoint


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def _form_id(request: Request) -> str:
    form_id = request.path_params["form_id"]
    if not _is_uuid(form_id):
        raise actions.InvalidInput(f"{form_id!r} is not a form id (a UUID)")
    return form_id


def _dlq_id(request: Request) -> str:
    dlq_id = request.path_params["dlq_id"]
    if not dlq_id.replace("-", "").isalnum() or len(dlq_id) > 100:
        raise actions.InvalidInput("not a DLQ id")
    return dlq_id


async def _fields(request: Request) -> dict[str, str]:
    """A posted HTML form (urlencoded; Starlette's own parser needs python-multipart)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip()
    body = await request.body()
    if body and kind != "application/x-www-form-urlencoded":
        raise actions.InvalidInput("post an HTML form (application/x-www-form-urlencoded)")
    if len(body) > MAX_FORM_BYTES:
        raise actions.InvalidInput("form too large")
    try:
        return dict(urllib.parse.parse_qsl(body.decode(), strict_parsing=bool(body)))
    except (UnicodeDecodeError, ValueError):
        raise actions.InvalidInput("malformed form data") from None


def _back(fields: dict[str, str], default: str, notice: str) -> Response:
    """See other: back to the page the button was on (a local path only), with a notice."""
    target = fields.get("next", "")
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        target = default
    target = target.split("?")[0]
    return RedirectResponse(f"{target}?notice={urllib.parse.quote(notice)}", status_code=303)
