"""Settings: one pydantic model per concern, field names are the environment variable names.

Read when first needed (never at import) from the environment and, in AWS, the formcall secret;
validated once and again only when the secret changes; a missing or malformed value raises
ConfigurationError naming the variable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from formcall import secrets
from formcall.errors import ConfigurationError

T = TypeVar("T", bound=BaseModel)

_SETTINGS = ConfigDict(extra="ignore", frozen=True, str_strip_whitespace=True)
_URL = r"^https?://[^\s/]+(/\S*)?$"


class ReceiverSettings(BaseModel):
    """Verifying QStash deliveries (current key, then next key for rotation)."""

    model_config = _SETTINGS
    QSTASH_CURRENT_SIGNING_KEY: SecretStr = Field(min_length=16)
    QSTASH_NEXT_SIGNING_KEY: SecretStr = Field(min_length=16)
    # Seconds of clock skew tolerated on `exp`/`nbf`/`iat`.
    QSTASH_CLOCK_TOLERANCE: int = Field(default=5, ge=0, le=300)


class PublisherSettings(BaseModel):
    """Publishing to QStash (messages, batches, schedules)."""

    model_config = _SETTINGS
    QSTASH_URL: str = Field(default="https://qstash.upstash.io", pattern=_URL)
    QSTASH_TOKEN: SecretStr = Field(min_length=1)


class CronSettings(BaseModel):
    """The shared secret of the manual sweep trigger and the setup call."""

    model_config = _SETTINGS
    CRON_SECRET: SecretStr = Field(min_length=16)


class DatabaseSettings(BaseModel):
    """Either DATABASE_URL (direct Postgres) or Supabase's URL and service-role key."""

    model_config = _SETTINGS
    DATABASE_URL: SecretStr | None = None
    SUPABASE_URL: str | None = Field(default=None, pattern=_URL)
    SUPABASE_SERVICE_ROLE_KEY: SecretStr | None = None

    @model_validator(mode="before")
    @classmethod
    def _public_supabase_url(cls, values: dict) -> dict:
        if not values.get("SUPABASE_URL") and values.get("NEXT_PUBLIC_SUPABASE_URL"):
            values = {**values, "SUPABASE_URL": values["NEXT_PUBLIC_SUPABASE_URL"]}
        for name in ("DATABASE_URL", "SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY"):
            if values.get(name) == "":
                values = {**values, name: None}
        return values

    @model_validator(mode="after")
    def _one_path(self) -> DatabaseSettings:
        if self.DATABASE_URL is None and (self.SUPABASE_URL is None
                                          or self.SUPABASE_SERVICE_ROLE_KEY is None):
            missing = [n for n in ("SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY")
                       if getattr(self, n) is None]
            raise ConfigurationError(
                missing, f"{' and '.join(missing)} must be set (or DATABASE_URL)")
        return self


class VapiServerSettings(BaseModel):
    """How Vapi's server messages (call-events) are authenticated.

    With VAPI_SERVER_CREDENTIAL_ID (an HMAC credential made in Vapi's dashboard whose secret is
    VAPI_WEBHOOK_SECRET) Vapi signs each message; without it formcall asks Vapi to send the
    secret itself in an X-Vapi-Secret header.
    """

    model_config = _SETTINGS
    VAPI_WEBHOOK_SECRET: SecretStr = Field(min_length=16)
    VAPI_SERVER_CREDENTIAL_ID: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _blank_is_unset(cls, values: dict) -> dict:
        if values.get("VAPI_SERVER_CREDENTIAL_ID") == "":
            values = {**values, "VAPI_SERVER_CREDENTIAL_ID": None}
        return values


class VapiSettings(VapiServerSettings):
    """Placing calls with Vapi, and where Vapi reports how they went (the call-events URL)."""

    VAPI_PRIVATE_KEY: SecretStr = Field(min_length=1)
    VAPI_ASSISTANT_ID: str = Field(min_length=1)
    VAPI_PHONE_NUMBER_ID: str = Field(min_length=1)
    VAPI_BASE_URL: str = Field(default="https://api.vapi.ai", pattern=_URL)
    # Create-call read timeout; past it the outcome is unknown and the call is never re-sent blindly.
    VAPI_TIMEOUT_SECONDS: float = Field(default=15.0, gt=0, le=120)
    CALL_EVENTS_URL: str = Field(pattern=_URL)


# Outcomes that may be followed up (formcall.outcomes.OUTCOMES less reached and bad_number).
FOLLOW_UP_OUTCOMES = frozenset({"no_answer", "busy", "voicemail", "not_connected"})


class CallRulesSettings(BaseModel):
    """How often a form and a patient may be called (the caps are the FCC's healthcare exemption)."""

    model_config = _SETTINGS
    # Attempts at one call (transient faults included) before the form is marked failed.
    MAX_CALL_ATTEMPTS: int = Field(default=5, ge=1, le=50)
    # Calls placed for one form, the first included.
    MAX_CALLS_PER_FORM: int = Field(default=3, ge=1, le=10)
    # Comma-separated outcomes after which an unsubmitted form is called again.
    FOLLOW_UP_ON: frozenset[str] = FOLLOW_UP_OUTCOMES
    FOLLOW_UP_DELAY_SECONDS: int = Field(default=86_400, ge=0, le=30 * 86_400)
    # Calls to one patient (any of their forms): per local calendar day, per rolling 7 days.
    PATIENT_MAX_CALLS_PER_DAY: int = Field(default=1, ge=1, le=50)
    PATIENT_MAX_CALLS_PER_WEEK: int = Field(default=3, ge=1, le=350)
    # A placed call without a reported end after this long is looked up in Vapi by the sweep.
    CALL_OUTCOME_TIMEOUT_SECONDS: int = Field(default=1800, ge=0, le=7 * 86_400)
    # A claim whose Vapi answer is unknown is looked up in Vapi's call list this long after it
    # was taken (and released when Vapi has no such call): longer than call-form's own timeout
    # (30 s), so the claimant is certainly done sending.
    CLAIM_LEASE_SECONDS: int = Field(default=60, ge=0, le=3600)

    @model_validator(mode="before")
    @classmethod
    def _outcome_list(cls, values: dict) -> dict:
        text = values.get("FOLLOW_UP_ON")
        if isinstance(text, str):
            names = frozenset(n.strip() for n in text.split(",") if n.strip())
            unknown = sorted(names - FOLLOW_UP_OUTCOMES)
            if unknown:
                raise ConfigurationError(["FOLLOW_UP_ON"], (
                    f"FOLLOW_UP_ON: {', '.join(unknown)} cannot be followed up; choose among "
                    f"{', '.join(sorted(FOLLOW_UP_OUTCOMES))} (comma-separated, or empty)"))
            values = {**values, "FOLLOW_UP_ON": names}
        return values

    @model_validator(mode="after")
    def _week_holds_a_day(self) -> CallRulesSettings:
        if self.PATIENT_MAX_CALLS_PER_WEEK < self.PATIENT_MAX_CALLS_PER_DAY:
            raise ConfigurationError(
                ["PATIENT_MAX_CALLS_PER_DAY", "PATIENT_MAX_CALLS_PER_WEEK"],
                "PATIENT_MAX_CALLS_PER_WEEK must be at least PATIENT_MAX_CALLS_PER_DAY")
        return self


class CallFormUrlSettings(BaseModel):
    """Where call-form messages go (the call-form Function URL)."""

    model_config = _SETTINGS
    CALL_FORM_URL: str = Field(pattern=_URL)


class CheckFormsUrlSettings(BaseModel):
    """Where the hourly schedule points (the check-forms Function URL)."""

    model_config = _SETTINGS
    CHECK_FORMS_URL: str = Field(pattern=_URL)


class WebhookSettings(BaseModel):
    """The shared secret Supabase Database Webhooks send to schedule-form."""

    model_config = _SETTINGS
    WEBHOOK_SECRET: SecretStr = Field(min_length=16)


class CallPolicySettings(BaseModel):
    """When and how fast calls go out: the calling window and Vapi's concurrent-call limit."""

    model_config = _SETTINGS
    # Patient-local window, e.g. "09:00-20:00" or "Mon-Fri 09:00-18:00" (formcall.window).
    CALL_WINDOW: str = "09:00-20:00"
    # Vapi's account-wide concurrent-call limit and the start rate QStash flow control allows:
    # lines x 60 / a typical call's seconds (10 lines, one-minute calls: 10 per minute).
    VAPI_MAX_CONCURRENCY: int = Field(default=10, ge=1, le=1000)
    VAPI_CALLS_PER_MINUTE: int = Field(default=10, ge=1, le=100_000)
    # The line ledger: formcall's calls hold lines from claim to end (call-events), at most
    # VAPI_MAX_CONCURRENCY less the lines kept free for the clinic's inbound calls.
    VAPI_LINE_LEDGER: bool = True
    VAPI_RESERVED_LINES: int = Field(default=0, ge=0, le=999)
    # The longest a call holds a line without a reported end: Vapi's default maximum call
    # duration (600 s) plus a margin.
    VAPI_MAX_CALL_SECONDS: int = Field(default=660, ge=10, le=43_260)
    # Where QStash reports a call-form message that failed for good (the failure-callback URL).
    FAILURE_CALLBACK_URL: str | None = Field(default=None, pattern=_URL)

    @model_validator(mode="before")
    @classmethod
    def _blank_is_unset(cls, values: dict) -> dict:
        return {k: (None if v == "" else v) for k, v in values.items()}

    @model_validator(mode="after")
    def _a_line_left(self) -> CallPolicySettings:
        if self.VAPI_RESERVED_LINES >= self.VAPI_MAX_CONCURRENCY:
            raise ConfigurationError(["VAPI_RESERVED_LINES", "VAPI_MAX_CONCURRENCY"],
                                     "VAPI_RESERVED_LINES must leave at least one of "
                                     "VAPI_MAX_CONCURRENCY's lines for formcall")
        return self

    def ledger_lines(self) -> int | None:
        """The lines formcall may hold, or None without the ledger (flow control only)."""
        if not self.VAPI_LINE_LEDGER:
            return None
        return self.VAPI_MAX_CONCURRENCY - self.VAPI_RESERVED_LINES


class PublicUrlSettings(BaseModel):
    """Optional public URLs, accepted as QStash subjects beside the URL derived from the request."""

    model_config = _SETTINGS
    CALL_FORM_URL: str | None = Field(default=None, pattern=_URL)
    CHECK_FORMS_URL: str | None = Field(default=None, pattern=_URL)

    @model_validator(mode="before")
    @classmethod
    def _blank_is_unset(cls, values: dict) -> dict:
        return {k: (None if v == "" else v) for k, v in values.items()}


# model -> (the secret's values it was validated with, the validated settings)
_validated: dict[type[BaseModel], tuple[Mapping[str, str], BaseModel]] = {}


def load(model: type[T]) -> T:
    """Validate `model` from the environment and, in AWS, the formcall secret (its keys win).

    Validated once per container, and again only when the secret's value changes: Powertools
    keeps it FORMCALL_SECRET_MAX_AGE seconds, so a rotated key is picked up without a
    redeploy. An unchanged result keeps its object, so clients built from it are kept too.
    """
    secret = {**secrets.parameter_values(), **secrets.secret_values()}
    cached = _validated.get(model)
    if cached is not None and cached[0] == secret:
        return cached[1]  # type: ignore[return-value]
    try:
        validated = model.model_validate({**os.environ, **secret})
    except ValidationError as exc:
        names = sorted({str(err["loc"][0]) for err in exc.errors() if err["loc"]})
        if not names:  # a model validator raised; its message names the variables
            raise ConfigurationError([], str(exc.errors()[0]["msg"])) from None
        where = " (in the formcall secret or the environment)" if secret else ""
        raise ConfigurationError(names,
                                 f"missing or malformed: {', '.join(names)}{where}") from None
    if cached is not None and cached[1] == validated:
        validated = cached[1]
    _validated[model] = (secret, validated)
    return validated  # type: ignore[return-value]


def reset() -> None:
    """Forget validated settings and the cached secret (tests; a container keeps them)."""
    _validated.clear()
    secrets.forget()
