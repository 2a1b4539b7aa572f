"""The create-call body and the one place errors become HTTP answers."""

from datetime import datetime, timezone

from formcall.errors import (ConfigurationError, DatabaseUnavailable, PermanentFailure,
                             VapiUnavailable)
from formcall.models import FormForCall
from formcall.vapi import call_request
from formcall.web import error_reply

FORM = FormForCall(id="f-1", title="Consent", deadline=datetime(2026, 12, 1, 9, tzinfo=timezone.utc),
                   patient_name="A" * 60, phone="+15550100002", timezone="UTC", call_attempts=1,
                   claimed_at=datetime(2026, 12, 1, 9, tzinfo=timezone.utc))


def test_call_request_fits_vapi_schema():
    body = call_request(FORM, assistant_id="asst", phone_number_id="pn")
    assert set(body) == {"assistantId", "phoneNumberId", "customer", "assistantOverrides"}
    assert body["customer"] == {"number": "+15550100002", "name": "A" * 40}
    assert body["assistantOverrides"]["metadata"] == {"formId": "f-1"}
    assert body["assistantOverrides"]["variableValues"] == {
        "patientName": "A" * 60, "formTitle": "Consent", "deadline": "2026-12-01T09:00:00+00:00"}


def test_permanent_failure_is_489_non_retryable():
    reply = error_reply(PermanentFailure("unknown form", formId="x"))
    assert (reply.status, reply.headers) == (489, {"Upstash-NonRetryable-Error": "true"})
    assert reply.payload == {"error": "unknown form", "formId": "x"}


def test_transient_failure_is_503_with_retry_after():
    reply = error_reply(VapiUnavailable("busy", retry_after=10))
    assert (reply.status, reply.headers) == (503, {"Retry-After": "10"})


def test_internal_detail_is_not_exposed():
    reply = error_reply(DatabaseUnavailable("database unavailable", cause="OperationalError"))
    assert reply.payload == {"error": "database unavailable"}


def test_configuration_error_names_the_setting():
    reply = error_reply(ConfigurationError(["QSTASH_TOKEN"], "missing or malformed: QSTASH_TOKEN"))
    assert reply.status == 500
    assert reply.payload["settings"] == ["QSTASH_TOKEN"]


def test_unexpected_errors_say_nothing_inside():
    reply = error_reply(KeyError("secret detail"))
    assert (reply.status, reply.payload) == (500, {"error": "internal error"})
