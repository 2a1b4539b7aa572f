"""failure-callback's use case: QStash gave up on a call-form message; record it on the form."""

from __future__ import annotations

import base64
import binascii
import json

from formcall.errors import BadRequest
from formcall.models import CallFormRequest
from formcall.observability import count, logger
from formcall.store import FormStore


def _as_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _as_text(value: object, limit: int = 200) -> str | None:
    """A string field of QStash's payload, as the database can store it (no NUL), or None."""
    return value.replace("\x00", "")[:limit] if isinstance(value, str) else None


def record_failed_delivery(payload: dict, *, store: FormStore) -> tuple[str, str]:
    """QStash's failure callback for a call-form message: mark the form failed with the reason."""
    try:
        source = base64.b64decode(payload.get("sourceBody") or "", validate=True)
        body = base64.b64decode(payload.get("body") or "").decode("utf-8", "replace")
        form_id = str(CallFormRequest.parse(source).formId)
    except (binascii.Error, ValueError, TypeError, BadRequest):
        raise BadRequest("not a QStash failure callback for a call-form message") from None
    # Only typed values reach the database: a string with a NUL cannot be stored (500, retried).
    status, retried = _as_int(payload.get("status")), _as_int(payload.get("retried")) or 0
    reason = f"QStash gave up after {retried} retries: last answer HTTP {status}"
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError, RecursionError):
        error = None
    if error:
        reason += f" ({str(error).replace(chr(0), '')[:200]})"
    detail = {
        "source_message_id": _as_text(payload.get("sourceMessageId")),
        "status": status,
        "retried": retried,
        "dlq_id": _as_text(payload.get("dlqId")),
    }
    outcome = store.record_delivery_failed(form_id, reason=reason, detail=detail)
    count("DeliveryFailed")
    logger.error(
        "call-form message failed for good",
        extra={"form_id": form_id, "status": status, "outcome": outcome},
    )
    return form_id, outcome
