"""The endedReason table against Vapi's published spec, and classify() on known and unknown values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from formcall.outcomes import ENDED_REASON_OUTCOME, OUTCOMES, classify

SPEC = Path(__file__).resolve().parents[2] / "dev/formcall_dev/vapi/reference/vapi-openapi.json"
MESSAGE_SCHEMAS = ("Call", "ServerMessageStatusUpdate", "ServerMessageEndOfCallReport")


def ended_reason_enum(schema: str) -> list[str]:
    if not SPEC.is_file():
        pytest.fail(f"Vapi's OpenAPI spec is missing at {SPEC}: it is part of the repository")
    spec = json.loads(SPEC.read_text(encoding="utf-8"))
    return spec["components"]["schemas"][schema]["properties"]["endedReason"]["enum"]


def test_the_table_has_exactly_the_specs_ended_reasons():
    enum = ended_reason_enum("Call")

    assert len(enum) == 627  # the spec lists some values twice
    assert sorted(ENDED_REASON_OUTCOME) == sorted(set(enum))


@pytest.mark.parametrize("schema", MESSAGE_SCHEMAS[1:])
def test_server_messages_use_the_same_enum_as_call(schema):
    assert set(ended_reason_enum(schema)) == set(ended_reason_enum("Call"))


def test_every_value_maps_to_one_known_class():
    assert set(ENDED_REASON_OUTCOME.values()) == set(OUTCOMES)
    assert all(classify(reason) in OUTCOMES for reason in ENDED_REASON_OUTCOME)


@pytest.mark.parametrize(
    ("reason", "outcome"),
    [
        ("customer-ended-call", "reached"),
        ("customer-ended-call-during-transfer", "reached"),
        ("assistant-ended-call", "reached"),
        ("assistant-ended-call-after-message-spoken", "reached"),
        ("assistant-said-end-call-phrase", "reached"),
        ("assistant-forwarded-call", "reached"),
        ("exceeded-max-duration", "reached"),
        ("voicemail", "voicemail"),
        ("customer-did-not-answer", "no_answer"),
        ("silence-timed-out", "no_answer"),
        ("customer-busy", "busy"),
        ("twilio-reported-customer-misdialed", "bad_number"),
        ("twilio-failed-to-connect-call", "not_connected"),
        ("vonage-failed-to-connect-call", "not_connected"),
        ("call.start.error-subscription-concurrency-limit-reached", "not_connected"),
        ("call.start.error-get-customer", "not_connected"),
        ("call.in-progress.error-vapifault-worker-died", "not_connected"),
        ("pipeline-error-openai-llm-failed", "not_connected"),
        ("manually-canceled", "not_connected"),
        ("call-deleted", "not_connected"),
        ("worker-shutdown", "not_connected"),
    ],
)
def test_key_values(reason, outcome):
    assert classify(reason) == outcome


def test_every_pipeline_and_start_error_is_not_connected_except_international():
    families = ("pipeline-error-", "call.start.error-")
    classes = {
        reason: outcome
        for reason, outcome in ENDED_REASON_OUTCOME.items()
        if reason.startswith(families)
    }

    assert len(classes) > 250
    assert {r for r, o in classes.items() if o != "not_connected"} == {
        "call.start.error-vapi-number-international"
    }


@pytest.mark.parametrize("reason", ["customer-teleported", None, ""])
def test_an_unknown_or_missing_reason_is_not_connected_with_a_warning(reason, caplog):
    assert classify(reason) == "not_connected"

    [record] = [r for r in caplog.records if r.name == "formcall"]
    assert record.levelname == "WARNING"
    assert record.ended_reason == ("<missing>" if reason is None else reason)


def test_a_known_reason_logs_nothing(caplog):
    classify("voicemail")

    assert [r for r in caplog.records if r.name == "formcall"] == []
