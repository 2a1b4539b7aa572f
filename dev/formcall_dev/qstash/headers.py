"""Parse QStash publish and schedule headers for the local QStash: durations, retry delays, cron."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import math
import operator
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import httpx
from croniter import croniter

METHODS = {"GET", "POST", "PUT", "DELETE", "PATCH"}
DEFAULT_RETRIES = 3
MAX_FLOW_PERIOD_S = 7 * 24 * 3600
SCHEDULE_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]+")

_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")

# Callback settings carried in Upstash-Callback-<Setting> (and the Failure-Callback twins);
# every other Upstash-Callback-* header is forwarded to the callback.
_CALLBACK_SETTINGS = {"retries", "timeout", "method", "retry-delay", "delay"}


class BadRequest(ValueError):
    """A publish or schedule request QStash would answer with 400."""


@dataclasses.dataclass
class MessageSpec:
    """Everything a publish (or a schedule trigger) says about the message to deliver."""

    url: str
    body: bytes = b""
    method: str = "POST"
    content_type: str | None = None
    header: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    max_retries: int = DEFAULT_RETRIES
    retry_delay: str | None = None
    timeout_s: float | None = None
    callback: dict | None = None
    failure_callback: dict | None = None
    flow_key: str | None = None
    flow_parallelism: int | None = None
    flow_rate: int | None = None
    flow_period_s: int | None = None
    label: str | None = None
    delay_s: float = 0.0
    not_before: int | None = None
    dedup_id: str | None = None
    content_dedup: bool = False

    def config_json(self) -> dict:
        """The settings a schedule keeps for each trigger (no url, body, not-before or dedup)."""
        data = dataclasses.asdict(self)
        for name in ("url", "body", "not_before", "dedup_id", "content_dedup"):
            data.pop(name)
        return data

    @classmethod
    def from_config_json(cls, config: dict, *, url: str, body: bytes) -> MessageSpec:
        return cls(url=url, body=body, **config)


def canonical_header(name: str) -> str:
    """Go's canonical header form (x-form-id -> X-Form-Id), which is how QStash reports names."""
    return "-".join(part[:1].upper() + part[1:].lower() for part in name.split("-"))


def check_url(url: str, what: str = "destination") -> str:
    if not url.lower().startswith(("http://", "https://")):
        raise BadRequest(
            f"invalid {what} url: endpoint has invalid scheme, add http:// or https://"
            " (URL groups and APIs are not supported by the local QStash)"
        )
    try:
        host = httpx.URL(url).host
    except (httpx.InvalidURL, ValueError) as exc:
        raise BadRequest(f"invalid {what} url: {exc}") from exc
    if not host:
        raise BadRequest(f"invalid {what} url: missing host")
    return url


def parse_duration(text: str, what: str) -> float:
    """Seconds in a QStash duration: 30s, 5m, 2h, 1d, compounds like 1h30m, or bare seconds."""
    text = text.strip()
    if text.isdigit():
        return float(text)
    if not _DURATION.fullmatch(text):
        raise BadRequest(f"invalid {what}: {text!r} (use a number with s, m, h or d, e.g. 1h30m)")
    parts = _DURATION_PART.findall(text)
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)


def _parse_int(text: str, what: str, *, minimum: int = 0) -> int:
    text = text.strip()
    if not text.isdigit() or int(text) < minimum:
        raise BadRequest(f"invalid {what}: {text!r}")
    return int(text)


# --- Upstash-Retry-Delay: a small arithmetic language, walked on a whitelisted AST, never eval().

_FUNCTIONS = {
    "pow": math.pow,
    "sqrt": math.sqrt,
    "abs": abs,
    "exp": math.exp,
    "floor": math.floor,
    "ceil": math.ceil,
    "round": round,
    "min": min,
    "max": max,
}
_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Mod: operator.mod,
    ast.Pow: math.pow,
}


def _evaluate(node: ast.AST, retried: float) -> float:
    match node:
        case ast.Constant(value=int() | float() as value) if not isinstance(value, bool):
            return float(value)
        case ast.Name(id="retried"):
            return retried
        case ast.BinOp(left=left, op=op, right=right) if type(op) in _BINARY:
            return float(_BINARY[type(op)](_evaluate(left, retried), _evaluate(right, retried)))
        case ast.UnaryOp(op=ast.USub(), operand=operand):
            return -_evaluate(operand, retried)
        case ast.UnaryOp(op=ast.UAdd(), operand=operand):
            return _evaluate(operand, retried)
        case ast.Call(func=ast.Name(id=name), args=[_, *_] as args, keywords=[]) if (
            name in _FUNCTIONS
        ):
            return float(_FUNCTIONS[name](*(_evaluate(arg, retried) for arg in args)))
    raise BadRequest(f"unsupported element in retry delay expression: {ast.dump(node)[:60]}")


def retry_delay_ms(expression: str, retried: int) -> float:
    """Milliseconds the expression gives; `retried` is 0 before the first retry."""
    if len(expression) > 500:
        raise BadRequest("retry delay expression is too long")
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as exc:
        raise BadRequest(f"invalid retry delay expression: {expression!r}") from exc
    try:
        return _evaluate(tree.body, float(retried))
    except (ArithmeticError, ValueError, TypeError) as exc:
        if isinstance(exc, BadRequest):
            raise
        # Overflow and domain errors mean "very long": the caller caps the wait at a day.
        return math.inf


# --- Flow control and cron.


def parse_flow_control(key: str, value: str) -> tuple[int | None, int | None, int | None]:
    """(parallelism, rate, period s) from `parallelism=2, rate=10, period=60s`; "" = no limit."""
    if not key.strip():
        raise BadRequest("invalid Upstash-Flow-Control-Key: empty")
    limits: dict[str, str] = {}
    for part in value.split(","):
        if not part.strip():
            continue
        name, sep, setting = part.partition("=")
        name = name.strip().lower()
        if not sep or name not in ("parallelism", "rate", "period") or name in limits:
            raise BadRequest(f"invalid Upstash-Flow-Control-Value: {value!r}")
        limits[name] = setting.strip()
    parallelism = (
        _parse_int(limits["parallelism"], "flow control parallelism", minimum=1)
        if "parallelism" in limits
        else None
    )
    rate = _parse_int(limits["rate"], "flow control rate", minimum=1) if "rate" in limits else None
    period = None
    if "period" in limits:
        period = parse_duration(limits["period"], "flow control period")
        if not 1 <= period <= MAX_FLOW_PERIOD_S:
            raise BadRequest("invalid flow control period: must be between 1s and 7d")
        period = int(period)
    elif rate is not None:
        period = 1
    return parallelism, rate, period


def split_cron(cron: str) -> tuple[ZoneInfo, str]:
    """(zone, five-field expression); a leading `CRON_TZ=<IANA zone> ` picks the zone, else UTC."""
    text = cron.strip()
    zone = ZoneInfo("UTC")
    if text.startswith("CRON_TZ="):
        zone_name, _, text = text[len("CRON_TZ=") :].partition(" ")
        try:
            zone = ZoneInfo(zone_name)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise BadRequest(f"invalid cron timezone: {zone_name!r}") from exc
        text = text.strip()
    if len(text.split()) != 5 or not croniter.is_valid(text):
        raise BadRequest(f"invalid cron expression: {cron!r}")
    return zone, text


def next_cron_time(cron: str, after: datetime) -> datetime:
    """The first tick strictly after `after`, in UTC."""
    zone, expression = split_cron(cron)
    return croniter(expression, after.astimezone(zone)).get_next(datetime).astimezone(UTC)


# --- Publish and schedule headers.


def _callback_settings(
    url: str, settings: dict[str, str], header: dict[str, list[str]], what: str
) -> dict:
    check_url(url, what)
    if "delay" in settings:
        raise BadRequest(f"{what} with a delay is not allowed")
    method = settings.get("method", "POST").upper()
    if method not in METHODS:
        raise BadRequest(f"invalid {what} method: {method!r}")
    retries = settings.get("retries")
    timeout = settings.get("timeout")
    retry_delay = settings.get("retry-delay")
    if retry_delay is not None:
        retry_delay_ms(retry_delay, 0)
    return {
        "url": url,
        "header": header,
        "method": method,
        "retries": _parse_int(retries, f"{what} retries") if retries is not None else None,
        "timeout_s": parse_duration(timeout, f"{what} timeout") if timeout is not None else None,
        "retry_delay": retry_delay,
    }


def parse_message_headers(
    headers: Iterable[tuple[str, str]], *, url: str, body: bytes, for_schedule: bool = False
) -> MessageSpec:
    """Read the Upstash-* configuration headers of a publish, batch element or schedule create."""
    spec = MessageSpec(url=check_url(url), body=body)
    plain: dict[str, str] = {}
    callback: dict[str, str] = {}
    callback_header: dict[str, list[str]] = {}
    failure: dict[str, str] = {}
    failure_header: dict[str, list[str]] = {}
    for name, value in headers:
        lower = name.lower()
        if lower.startswith("upstash-forward-"):
            spec.header.setdefault(canonical_header(name[16:]), []).append(value)
        elif lower.startswith("upstash-failure-callback-"):
            _sort_callback_header(name[25:], value, failure, failure_header)
        elif lower.startswith("upstash-callback-"):
            _sort_callback_header(name[17:], value, callback, callback_header)
        else:
            plain[lower] = value

    if "content-type" in plain:
        spec.content_type = plain["content-type"]
    if "upstash-method" in plain:
        spec.method = plain["upstash-method"].strip().upper()
        if spec.method not in METHODS:
            raise BadRequest(f"invalid Upstash-Method: {plain['upstash-method']!r}")
    if "upstash-retries" in plain:
        spec.max_retries = _parse_int(plain["upstash-retries"], "Upstash-Retries")
    if "upstash-retry-delay" in plain:
        spec.retry_delay = plain["upstash-retry-delay"]
        if math.isnan(retry_delay_ms(spec.retry_delay, 0)):
            raise BadRequest("invalid retry delay expression: not a number")
    if "upstash-timeout" in plain:
        spec.timeout_s = parse_duration(plain["upstash-timeout"], "Upstash-Timeout")
        if spec.timeout_s <= 0:
            raise BadRequest("invalid Upstash-Timeout: must be positive")
    if "upstash-delay" in plain:
        spec.delay_s = parse_duration(plain["upstash-delay"], "Upstash-Delay")
    if "upstash-label" in plain:
        spec.label = plain["upstash-label"]
    if "upstash-callback" in plain:
        spec.callback = _callback_settings(
            plain["upstash-callback"], callback, callback_header, "callback"
        )
    if "upstash-failure-callback" in plain:
        spec.failure_callback = _callback_settings(
            plain["upstash-failure-callback"], failure, failure_header, "failure callback"
        )
    if "upstash-flow-control-key" in plain:
        spec.flow_key = plain["upstash-flow-control-key"].strip()
        spec.flow_parallelism, spec.flow_rate, spec.flow_period_s = parse_flow_control(
            spec.flow_key, plain.get("upstash-flow-control-value", "")
        )
    elif "upstash-flow-control-value" in plain:
        raise BadRequest("Upstash-Flow-Control-Value needs Upstash-Flow-Control-Key")
    if plain.get("upstash-queue-name"):
        raise BadRequest("queues are not supported by the local QStash")

    if not for_schedule:
        if "upstash-not-before" in plain:
            spec.not_before = _parse_int(plain["upstash-not-before"], "Upstash-Not-Before")
        if plain.get("upstash-deduplication-id"):
            spec.dedup_id = plain["upstash-deduplication-id"]
        cbd = plain.get("upstash-content-based-deduplication", "false").strip().lower()
        if cbd not in ("true", "false"):
            raise BadRequest(f"invalid Upstash-Content-Based-Deduplication: {cbd!r}")
        spec.content_dedup = cbd == "true"
    return spec


def _sort_callback_header(
    suffix: str, value: str, settings: dict[str, str], header: dict[str, list[str]]
) -> None:
    lower = suffix.lower()
    if lower in _CALLBACK_SETTINGS:
        settings[lower] = value
    elif lower.startswith("forward-"):
        header.setdefault(canonical_header(suffix[8:]), []).append(value)
    else:
        # The SDK's callback_headers={"Foo": ..} arrives as Upstash-Callback-Foo; forward it as Foo.
        header.setdefault(canonical_header(suffix), []).append(value)


def content_dedup_key(spec: MessageSpec) -> str:
    """Content-based deduplication covers destination, body, content type and forwarded headers."""
    digest = hashlib.sha256()
    for part in (spec.url, spec.content_type or "", repr(sorted(spec.header.items()))):
        digest.update(part.encode() + b"\0")
    digest.update(spec.body)
    return "content:" + digest.hexdigest()
