"""call-events: Vapi's status-update and end-of-call-report messages; record how each call went."""

from formcall import clients, settings
from formcall.call_events import record_call_event
from formcall.vapi_webhooks import parse_server_message, verify_vapi_request
from formcall.web import Incoming, Reply, create_app, lambda_handler


def handle(request: Incoming) -> Reply:
    server = settings.load(settings.VapiServerSettings)
    verify_vapi_request(
        request.headers,
        request.body,
        secret=server.VAPI_WEBHOOK_SECRET.get_secret_value(),
        credential_id=server.VAPI_SERVER_CREDENTIAL_ID,
    )
    kind, event = parse_server_message(request.body)
    result = record_call_event(
        event,
        store=clients.store(),
        publisher=clients.publisher,
        call_form_url=settings.load(settings.CallFormUrlSettings).CALL_FORM_URL,
        window=clients.window(),
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


app = create_app(handle, paths=["/api/webhooks/vapi"], methods=["POST"])
handler = lambda_handler(app)
