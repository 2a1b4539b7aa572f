"""call-events: Vapi's status-update and end-of-call-report messages; record how each call went."""

from functools import partial

from formcall import clients
from formcall.call_events import record_call_event
from formcall.settings import CallEventsSettings
from formcall.vapi_webhooks import parse_server_message, verify_vapi_request
from formcall.web import Incoming, Reply, create_app, lambda_handler


def handle(request: Incoming, config: CallEventsSettings) -> Reply:
    verify_vapi_request(
        request.headers,
        request.body,
        secret=config.VAPI_WEBHOOK_SECRET.get_secret_value(),
        credential_id=config.VAPI_SERVER_CREDENTIAL_ID,
    )
    kind, event = parse_server_message(request.body)
    result = record_call_event(
        event,
        store=clients.store(config),
        publisher=partial(clients.publisher, config),
        call_form_url=config.CALL_FORM_URL,
        window=clients.window(config),
    )
    if result.status == "ignored":
        return Reply({"status": "ignored", "type": kind, "reason": result.reason})
    return Reply(
        {
            "status": "recorded",
            "type": kind,
            "callId": event.vapi_call_id,
            "ended": result.ended,
            "outcome": result.outcome,
            "followUps": len(result.follow_ups),
        }
    )


app = create_app(
    handle, settings=CallEventsSettings, paths=["/api/webhooks/vapi"], methods=["POST"]
)
handler = lambda_handler(app)
