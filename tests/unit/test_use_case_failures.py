"""record_failed_delivery: QStash's failure callback parsed into one typed record on the form."""

from __future__ import annotations

import base64
import json

import pytest

from formcall.errors import BadRequest
from formcall.failures import record_failed_delivery
from formcall.store import FormStore
from tests.support import metrics
from tests.support.rpc import ScriptedRpc

FORM = "11111111-1111-4111-8111-111111111111"


@pytest.fixture(autouse=True)
def clean_metrics():
    metrics.reset()
    yield
    metrics.reset()


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def callback(**fields) -> dict:
    payload = {
        "sourceBody": b64(json.dumps({"formId": FORM})),
        "body": b64(json.dumps({"error": "no Vapi line free"})),
        "status": 503,
        "retried": 5,
        "sourceMessageId": "msg_1",
        "dlqId": "dlq_1",
    }
    return {**payload, **fields}


def record(payload: dict, outcome: str = "failed"):
    rpc = ScriptedRpc().answer("record_delivery_failed", {"outcome": outcome})
    return record_failed_delivery(payload, store=FormStore(rpc)), rpc


def test_a_failed_delivery_is_recorded_with_the_last_answer():
    (form_id, outcome), rpc = record(callback())

    assert (form_id, outcome) == (FORM, "failed")
    assert rpc.params("record_delivery_failed") == [
        {
            "p_form_id": FORM,
            "p_reason": "QStash gave up after 5 retries: last answer HTTP 503 (no Vapi line free)",
            "p_detail": {
                "source_message_id": "msg_1",
                "status": 503,
                "retried": 5,
                "dlq_id": "dlq_1",
            },
        }
    ]
    assert metrics.counted() == {"DeliveryFailed": 1}


def test_the_store_outcome_is_returned():
    (_, outcome), _ = record(callback(), outcome="called")

    assert outcome == "called"


@pytest.mark.parametrize(
    "fields",
    [
        {"sourceBody": "not base64!"},
        {"sourceBody": None},
        {"sourceBody": b64("not json")},
        {"sourceBody": b64(json.dumps({"formId": "not-a-uuid"}))},
        {"sourceBody": b64(json.dumps(["a list"]))},
        {"sourceBody": b64(json.dumps({}))},
        {"sourceBody": 42},
    ],
)
def test_a_payload_that_is_not_a_call_form_failure_is_a_bad_request(fields):
    rpc = ScriptedRpc()

    with pytest.raises(BadRequest) as raised:
        record_failed_delivery(callback(**fields), store=FormStore(rpc))

    assert raised.value.status == 400
    assert raised.value.public_message == "not a QStash failure callback for a call-form message"
    assert rpc.calls == []


@pytest.mark.parametrize(
    "body",
    [
        b64("<html>bad gateway</html>"),
        b64(json.dumps(["x"])),
        b64(json.dumps({"other": 1})),
        b64(json.dumps({"error": ""})),
        None,
        b64(b"\xff\xfe"),
    ],
)
def test_a_last_answer_without_an_error_gives_the_status_only(body):
    (_, _), rpc = record(callback(body=body))

    assert rpc.params("record_delivery_failed")[0]["p_reason"] == (
        "QStash gave up after 5 retries: last answer HTTP 503"
    )


def test_a_deeply_nested_last_answer_is_no_error():
    (_, _), rpc = record(callback(body=b64("[" * 100_000 + "]" * 100_000)))

    assert rpc.params("record_delivery_failed")[0]["p_reason"].endswith("HTTP 503")


def test_the_error_text_is_bounded_and_has_no_nul():
    (_, _), rpc = record(callback(body=b64(json.dumps({"error": "a\x00b" + "x" * 500}))))

    reason = rpc.params("record_delivery_failed")[0]["p_reason"]
    assert "\x00" not in reason
    assert reason.endswith("(ab" + "x" * 198 + ")")


@pytest.mark.parametrize(
    "status, retried, expected",
    [
        ("503", "5", "after 0 retries: last answer HTTP None"),
        (True, True, "after 0 retries: last answer HTTP None"),
        (None, None, "after 0 retries: last answer HTTP None"),
        (502, 0, "after 0 retries: last answer HTTP 502"),
    ],
)
def test_only_integers_are_taken_as_status_and_retries(status, retried, expected):
    (_, _), rpc = record(callback(status=status, retried=retried))

    [params] = rpc.params("record_delivery_failed")
    assert expected in params["p_reason"]
    assert params["p_detail"]["status"] == (
        status if isinstance(status, int) and not isinstance(status, bool) else None
    )


def test_text_fields_are_stored_without_nul_and_bounded_or_dropped_when_not_text():
    (_, _), rpc = record(callback(sourceMessageId="msg_\x00" + "y" * 300, dlqId={"id": 1}))

    detail = rpc.params("record_delivery_failed")[0]["p_detail"]
    assert detail["source_message_id"] == "msg_" + "y" * 196
    assert detail["dlq_id"] is None
