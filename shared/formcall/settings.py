"""Settings: one pydantic model per function, composed of concern mixins; field names are env names.

Each concern (the QStash signing keys, the database, the follow-up rules, ...) declares its
variables once; each function's model (`CallFormSettings`, ...) composes exactly the concerns
that function uses, so its needs are visible in one place. The function's edge (web.py) loads
that one model once per request, from the environment and, in AWS, the formcall secrets;
it is validated once per container and again only when a secret changes. A missing or
malformed value raises ConfigurationError naming the variable.

URLs: a URL setting always names one endpoint. Where it is a destination (where messages or
the schedule go) it is required, but for FAILURE_CALLBACK_URL (without it messages carry no
failure callback); a function's own URL (`public_url`) is only an extra signed subject
accepted beside the URL the request arrived on (behind the edge), so it is optional unless
the function also publishes to itself (call-form).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from formcall import secrets
from formcall.errors import ConfigurationError

_SETTINGS = ConfigDict(extra="ignore", frozen=True, str_strip_whitespace=True)
_URL = r"^https?://[^\s/]+(/\S*)?$"


def _blank_is_unset(values: object, names: tuple[str, ...]) -> object:
    """An empty value of an optional setting (a template's `""` default) counts as not set."""
    if not isinstance(values, dict):
        return values
    return {k: (None if k in names and v == "" else v) for k, v in values.items()}


# --- Concerns: each variable is declared in exactly one ------------------------------------


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


class WebhookSettings(BaseModel):
    """The key of the HMAC the database's signed webhooks to schedule-form carry."""

    model_config = _SETTINGS
    WEBHOOK_SECRET: SecretStr = Field(min_length=16)


class DatabaseSettings(BaseModel):
    """Either DATABASE_URL (direct Postgres) or Supabase's URL and service-role key."""

    model_config = _SETTINGS
    DATABASE_URL: SecretStr | None = None
    SUPABASE_URL: str | None = Field(default=None, pattern=_URL)
    SUPABASE_SERVICE_ROLE_KEY: SecretStr | None = None

    @model_validator(mode="before")
    @classmethod
    def _database_blanks_and_alias(cls, values: object) -> object:
        # The Next.js app's name for the same URL is accepted too.
        if isinstance(values, dict) and not values.get("SUPABASE_URL"):
            if values.get("NEXT_PUBLIC_SUPABASE_URL"):
                values = {**values, "SUPABASE_URL": values["NEXT_PUBLIC_SUPABASE_URL"]}
        return _blank_is_unset(
            values, ("DATABASE_URL", "SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY")
        )

    @model_validator(mode="after")
    def _one_database_path(self) -> DatabaseSettings:
        if self.DATABASE_URL is None and (
            self.SUPABASE_URL is None or self.SUPABASE_SERVICE_ROLE_KEY is None
        ):
            missing = [
                n for n in ("SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY") if getattr(self, n) is None
            ]
            raise ConfigurationError(
                missing, f"{' and '.join(missing)} must be set (or DATABASE_URL)"
            )
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
    def _server_blanks(cls, values: object) -> object:
        return _blank_is_unset(values, ("VAPI_SERVER_CREDENTIAL_ID",))


class VapiSettings(VapiServerSettings):
    """Placing and looking up calls with Vapi; each call names call-events as its server."""

    VAPI_PRIVATE_KEY: SecretStr = Field(min_length=1)
    VAPI_ASSISTANT_ID: str = Field(min_length=1)
    VAPI_PHONE_NUMBER_ID: str = Field(min_length=1)
    VAPI_BASE_URL: str = Field(default="https://api.vapi.ai", pattern=_URL)
    # Create-call read timeout; past it the outcome is unknown: the call is never re-sent blindly
    # (it is reconciled).
    VAPI_TIMEOUT_SECONDS: float = Field(default=15.0, gt=0, le=120)
    # Where Vapi reports how each call went (call-events' URL).
    CALL_EVENTS_URL: str = Field(pattern=_URL)


class CallWindowSettings(BaseModel):
    """When patients may be called, in their own time zone."""

    model_config = _SETTINGS
    # Patient-local window, e.g. "09:00-20:00" or "Mon-Fri 09:00-18:00" (formcall.window).
    CALL_WINDOW: str = "09:00-20:00"

    @model_validator(mode="after")
    def _window_parses(self) -> CallWindowSettings:
        from formcall.window import parse_window  # pure arithmetic; kept out of import time

        try:
            parse_window(self.CALL_WINDOW)
        except ValueError as exc:
            raise ConfigurationError(["CALL_WINDOW"], f"CALL_WINDOW is malformed: {exc}") from None
        return self


class FlowControlSettings(BaseModel):
    """How fast QStash delivers call-form messages: Vapi's lines (QStash flow control)."""

    model_config = _SETTINGS
    # Vapi's account-wide concurrent-call limit and the start rate QStash flow control allows:
    # lines x 60 / a typical call's seconds (10 lines, one-minute calls: 10 per minute).
    VAPI_MAX_CONCURRENCY: int = Field(default=10, ge=1, le=1000)
    VAPI_CALLS_PER_MINUTE: int = Field(default=10, ge=1, le=100_000)
    # The line ledger (LineLedgerSettings) holds the lines: flow control then bounds only the
    # deliveries in flight, with no start rate.
    VAPI_LINE_LEDGER: bool = True


class LineLedgerSettings(FlowControlSettings):
    """The line ledger: formcall's calls hold Vapi lines from claim to end (call-events)."""

    # Of VAPI_MAX_CONCURRENCY, the lines kept free for the clinic's inbound calls.
    VAPI_RESERVED_LINES: int = Field(default=0, ge=0, le=999)
    # The longest a call holds a line without a reported end: Vapi's default maximum call
    # duration (600 s) plus a margin.
    VAPI_MAX_CALL_SECONDS: int = Field(default=660, ge=10, le=43_260)

    @model_validator(mode="after")
    def _a_line_left(self) -> LineLedgerSettings:
        if self.VAPI_RESERVED_LINES >= self.VAPI_MAX_CONCURRENCY:
            raise ConfigurationError(
                ["VAPI_RESERVED_LINES", "VAPI_MAX_CONCURRENCY"],
                "VAPI_RESERVED_LINES must leave at least one of "
                "VAPI_MAX_CONCURRENCY's lines for formcall",
            )
        return self

    def ledger_lines(self) -> int | None:
        """The lines formcall may hold, or None without the ledger (flow control only)."""
        if not self.VAPI_LINE_LEDGER:
            return None
        return self.VAPI_MAX_CONCURRENCY - self.VAPI_RESERVED_LINES


class CallCapsSettings(BaseModel):
    """What a claim allows: attempts at one call, calls to one patient (the FCC's exemption)."""

    model_config = _SETTINGS
    # Attempts at one call (transient faults included) before the form is marked failed.
    MAX_CALL_ATTEMPTS: int = Field(default=5, ge=1, le=50)
    # Calls to one patient (any of their forms): per local calendar day, per rolling 7 days.
    PATIENT_MAX_CALLS_PER_DAY: int = Field(default=1, ge=1, le=50)
    PATIENT_MAX_CALLS_PER_WEEK: int = Field(default=3, ge=1, le=350)

    @model_validator(mode="after")
    def _week_holds_a_day(self) -> CallCapsSettings:
        if self.PATIENT_MAX_CALLS_PER_WEEK < self.PATIENT_MAX_CALLS_PER_DAY:
            raise ConfigurationError(
                ["PATIENT_MAX_CALLS_PER_DAY", "PATIENT_MAX_CALLS_PER_WEEK"],
                "PATIENT_MAX_CALLS_PER_WEEK must be at least PATIENT_MAX_CALLS_PER_DAY",
            )
        return self


# Outcomes that may be followed up (formcall.outcomes.OUTCOMES less reached and bad_number).
FOLLOW_UP_OUTCOMES = frozenset({"no_answer", "busy", "voicemail", "not_connected"})


class FollowUpSettings(BaseModel):
    """What happens after a call ended without reaching the patient: when it is made again."""

    model_config = _SETTINGS
    # Calls placed for one form, the first included.
    MAX_CALLS_PER_FORM: int = Field(default=3, ge=1, le=10)
    # Comma-separated outcomes after which an unsubmitted form is called again.
    FOLLOW_UP_ON: frozenset[str] = FOLLOW_UP_OUTCOMES
    FOLLOW_UP_DELAY_SECONDS: int = Field(default=86_400, ge=0, le=30 * 86_400)

    @model_validator(mode="before")
    @classmethod
    def _outcome_list(cls, values: object) -> object:
        if not isinstance(values, dict):
            return values
        text = values.get("FOLLOW_UP_ON")
        if isinstance(text, str):
            names = frozenset(n.strip() for n in text.split(",") if n.strip())
            unknown = sorted(names - FOLLOW_UP_OUTCOMES)
            if unknown:
                raise ConfigurationError(
                    ["FOLLOW_UP_ON"],
                    (
                        f"FOLLOW_UP_ON: {', '.join(unknown)} cannot be followed up; choose among "
                        f"{', '.join(sorted(FOLLOW_UP_OUTCOMES))} (comma-separated, or empty)"
                    ),
                )
            values = {**values, "FOLLOW_UP_ON": names}
        return values


class ClaimLeaseSettings(BaseModel):
    """When a claim whose Vapi answer is unknown is checked against Vapi's call list."""

    model_config = _SETTINGS
    # This long after the claim was taken (and released when Vapi has no such call): longer
    # than call-form's own timeout (30 s), so the claimant is certainly done sending.
    CLAIM_LEASE_SECONDS: int = Field(default=60, ge=0, le=3600)


class OutcomeTimeoutSettings(BaseModel):
    """When the sweep looks up a placed call whose end was never reported."""

    model_config = _SETTINGS
    CALL_OUTCOME_TIMEOUT_SECONDS: int = Field(default=1800, ge=0, le=7 * 86_400)


class CallFormUrlSettings(BaseModel):
    """call-form's URL: where every call-form message goes (deferred and follow-ups included)."""

    model_config = _SETTINGS
    CALL_FORM_URL: str = Field(pattern=_URL)


class CheckFormsUrlSettings(BaseModel):
    """check-forms' URL: the hourly schedule's destination (setup requires it, see SetupSettings)."""

    model_config = _SETTINGS
    CHECK_FORMS_URL: str | None = Field(default=None, pattern=_URL)

    @model_validator(mode="before")
    @classmethod
    def _check_forms_blank(cls, values: object) -> object:
        return _blank_is_unset(values, ("CHECK_FORMS_URL",))


class FailureCallbackUrlSettings(BaseModel):
    """failure-callback's URL: where QStash reports a call-form message it gave up on.

    Optional: without it messages carry no failure callback (the local tests' default).
    """

    model_config = _SETTINGS
    FAILURE_CALLBACK_URL: str | None = Field(default=None, pattern=_URL)

    @model_validator(mode="before")
    @classmethod
    def _failure_callback_blank(cls, values: object) -> object:
        return _blank_is_unset(values, ("FAILURE_CALLBACK_URL",))


# --- One model per function: exactly the concerns it uses ------------------------------------
# template.yaml gives each function these variables and no others
# (tests/integration/test_sam.py checks both ways).


class CallFormSettings(
    ReceiverSettings,
    DatabaseSettings,
    CallCapsSettings,
    LineLedgerSettings,
    ClaimLeaseSettings,
    VapiSettings,
    PublisherSettings,
    CallWindowSettings,
    CallFormUrlSettings,
    FailureCallbackUrlSettings,
):
    """call-form: verifies a delivery, claims, calls Vapi, defers to its own URL."""

    @property
    def public_url(self) -> str:
        return self.CALL_FORM_URL


class CheckFormsSettings(
    ReceiverSettings,
    CronSettings,
    DatabaseSettings,
    FollowUpSettings,
    LineLedgerSettings,
    ClaimLeaseSettings,
    OutcomeTimeoutSettings,
    VapiSettings,
    PublisherSettings,
    CallWindowSettings,
    CallFormUrlSettings,
    CheckFormsUrlSettings,
    FailureCallbackUrlSettings,
):
    """check-forms: the sweep (reconcile, lost outcomes, due forms enqueued to call-form)."""

    @property
    def public_url(self) -> str | None:
        return self.CHECK_FORMS_URL


class SetupSettings(CronSettings, PublisherSettings, CheckFormsUrlSettings):
    """setup: creates or overwrites the hourly schedule that POSTs to check-forms."""

    # The schedule's destination: optional to check-forms itself, required here.
    CHECK_FORMS_URL: str = Field(pattern=_URL)


class FormScheduleSettings(
    DatabaseSettings,
    PublisherSettings,
    FlowControlSettings,
    CallWindowSettings,
    CallFormUrlSettings,
    FailureCallbackUrlSettings,
):
    """Keeping a form's one-time call-form message in step with it (`formcall schedule` too)."""


class ScheduleFormSettings(WebhookSettings, FormScheduleSettings):
    """schedule-form: keeps each form's one-time call-form message in step with its deadline."""


class FailureCallbackSettings(ReceiverSettings, DatabaseSettings, FailureCallbackUrlSettings):
    """failure-callback: marks the form of a message QStash gave up on failed."""

    @property
    def public_url(self) -> str | None:
        return self.FAILURE_CALLBACK_URL


class CallEventsSettings(
    VapiServerSettings,
    DatabaseSettings,
    FollowUpSettings,
    LineLedgerSettings,
    PublisherSettings,
    CallWindowSettings,
    CallFormUrlSettings,
    FailureCallbackUrlSettings,
):
    """call-events: records how each call went; follow-ups, opt-outs, freed lines."""


FUNCTION_SETTINGS: Mapping[str, type[BaseModel]] = {
    "call_form": CallFormSettings,
    "check_forms": CheckFormsSettings,
    "setup": SetupSettings,
    "schedule_form": ScheduleFormSettings,
    "failure_callback": FailureCallbackSettings,
    "call_events": CallEventsSettings,
}


# --- Loading ---------------------------------------------------------------------------------

# model -> (the secrets' values it was validated with, the validated settings)
_validated: dict[type[BaseModel], tuple[Mapping[str, str], BaseModel]] = {}
# How often each model was asked for and how often it was validated (observability: a request
# asks once; validation happens once per container and after a secret changed).
loads: Counter[str] = Counter()
validations: Counter[str] = Counter()


def load[T: BaseModel](model: type[T]) -> T:
    """Validate `model` from the environment and, in AWS, the formcall secrets (their keys win).

    Validated once per container, and again only when a secret's value changes: Powertools
    keeps it FORMCALL_SECRET_MAX_AGE seconds, so a rotated key is picked up without a
    redeploy. An unchanged result keeps its object, so clients built from it are kept too.
    """
    loads[model.__name__] += 1
    secret = {**secrets.parameter_values(), **secrets.secret_values()}
    cached = _validated.get(model)
    if cached is not None and cached[0] == secret:
        return cached[1]  # type: ignore[return-value]
    validations[model.__name__] += 1
    try:
        # Model validators raise ConfigurationError themselves (naming their variables); it is
        # not a ValueError, so pydantic lets it through unwrapped.
        validated = model.model_validate({**os.environ, **secret})
    except ValidationError as exc:
        # Every field error has its variable as loc[0]; the messages (which may quote a
        # value) are never repeated.
        names = sorted({str(err["loc"][0]) for err in exc.errors()})
        where = " (in the formcall secret or the environment)" if secret else ""
        raise ConfigurationError(
            names, f"missing or malformed: {', '.join(names)}{where}"
        ) from None
    if cached is not None and cached[1] == validated:
        validated = cached[1]
    _validated[model] = (secret, validated)
    return validated


def reset() -> None:
    """Forget validated settings, the counters and the cached secret (tests; a container keeps them)."""
    _validated.clear()
    loads.clear()
    validations.clear()
    secrets.forget()
