"""The error family, each error carrying the HTTP status it maps to (mapped in web.py only)."""

from __future__ import annotations


class FormcallError(Exception):
    """Base class; `status` is the HTTP answer, `public_message` what the caller may read."""

    status = 500

    def __init__(self, public_message: str, **detail: object) -> None:
        super().__init__(public_message)
        self.public_message = public_message
        self.detail = detail


class BadRequest(FormcallError):
    status = 400


class Unauthorized(FormcallError):
    status = 401


class ConfigurationError(FormcallError):
    """A setting is missing or malformed; `names` lists the environment variables at fault."""

    status = 500

    def __init__(self, names: list[str], problem: str) -> None:
        super().__init__(f"configuration error: {problem}", settings=names)
        self.names = names


class PermanentFailure(FormcallError):
    """Retrying cannot help: QStash must stop (489 + Upstash-NonRetryable-Error)."""

    status = 489


class TransientFailure(FormcallError):
    """Nothing was done that cannot be done again: QStash should retry (503)."""

    status = 503

    def __init__(self, public_message: str, *, retry_after: int | None = None, **detail: object):
        super().__init__(public_message, **detail)
        self.retry_after = retry_after


class DatabaseUnavailable(TransientFailure):
    pass


class VapiUnavailable(TransientFailure):
    """Vapi did not place the call (5xx, 429, connection refused, concurrency limit)."""


class VapiBusy(VapiUnavailable):
    """Vapi's concurrent-call limit was reached: the call was created blocked, never placed."""


class VapiRejected(PermanentFailure):
    """Vapi refused the call with a 4xx other than 429: the request itself is wrong."""


class CallOutcomeUnknown(Exception):
    """The create-call request may have reached Vapi, but no answer came back."""


class PayloadTooLarge(FormcallError):
    status = 413


class Replayed(FormcallError):
    """A signed QStash token used a second time: a captured request played again.

    409, not 489: QStash signs every attempt afresh, so it never meets this answer for its own
    retries; and were it ever to, a retryable answer brings a fresh token, where 489 would
    dead-letter the message and fail the form.
    """

    status = 409
