"""The create-call body and the one place errors become HTTP answers."""

from datetime import UTC, datetime

from formcall.errors import (
    ConfigurationError,
    DatabaseUnavailable,
    PermanentFailure,
    VapiUnavailable,
)
from formcall.models import FormOnCall, PatientCall
from formcall.vapi import call_request, redact, server_override
from formcall.web import error_reply
from formcall_dev.vapi.spec import validate

AT = datetime(2026, 12, 1, 9, tzinfo=UTC)
CALL = PatientCall(
    call_id="c-1",
    patient_id="p-1",
    patient_name="A" * 60,
    phone="+15550100002",
    timezone="UTC",
    claimed_at=AT,
    forms=(
        FormOnCall(id="f-1", title="Consent", deadline=AT, call_attempts=1),
        FormOnCall(id="f-2", title="Intake", deadline=AT, call_attempts=1),
    ),
)
HEADER_SERVER = server_override(url="https://events.example/", secret="s" * 24, credential_id=None)
HMAC_SERVER = server_override(
    url="https://events.example/", secret="s" * 24, credential_id="cred-123"
)


def test_call_request_covers_every_form_of_the_patient():
    body = call_request(CALL, assistant_id="asst", phone_number_id="pn", server=HEADER_SERVER)
    assert set(body) == {"assistantId", "phoneNumberId", "customer", "assistantOverrides"}
    assert body["customer"] == {"number": "+15550100002", "name": "A" * 40}
    overrides = body["assistantOverrides"]
    assert overrides["metadata"] == {"formId": "f-1", "formIds": ["f-1", "f-2"]}
    assert overrides["variableValues"] == {
        "patientName": "A" * 60,
        "formTitle": "Consent",
        "formTitles": "Consent, Intake",
        "formCount": 2,
        "deadline": "2026-12-01T09:00:00+00:00",
    }
    assert overrides["serverMessages"] == ["status-update", "end-of-call-report"]


def test_call_request_validates_against_vapis_create_call_dto():
    for server in (HEADER_SERVER, HMAC_SERVER):
        body = call_request(CALL, assistant_id="asst", phone_number_id="pn", server=server)
        assert validate("CreateCallDTO", body) == []
    # The validator is real: a wrong shape is caught.
    broken = call_request(CALL, assistant_id="asst", phone_number_id="pn", server=HEADER_SERVER)
    broken["assistantOverrides"]["server"]["backoffPlan"]["maxRetries"] = 99
    assert validate("CreateCallDTO", broken) != []


def test_server_override_authenticates_one_way():
    assert HEADER_SERVER["headers"] == {"X-Vapi-Secret": "s" * 24}
    assert "credentialId" not in HEADER_SERVER
    assert HMAC_SERVER["credentialId"] == "cred-123" and "headers" not in HMAC_SERVER


def test_provider_text_loses_numbers_and_names():
    text = "could not dial +1 (555) 010-0002 for Grace Hopper; grace hopper busy"
    assert (
        redact(text, names=("Grace Hopper",)) == "could not dial [number] for [name]; [name] busy"
    )


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
