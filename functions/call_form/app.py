"""call-form: QStash delivers a form's due moment; claim the patient's due forms, call, record."""

from functools import partial

from formcall import clients
from formcall.call_form import call_form
from formcall.models import CallFormRequest
from formcall.settings import CallFormSettings
from formcall.web import Incoming, Reply, create_app, lambda_handler, verify_qstash


def handle(request: Incoming, config: CallFormSettings) -> Reply:
    store = clients.store(config)
    claims = verify_qstash(request, keys=config, public_url=config.public_url, store=store)
    form_id = str(CallFormRequest.parse(request.body).formId)
    # The token id is signed; QStash's message headers are not, so they are kept as unverified.
    delivery = {
        "jti": claims.get("jti"),
        "unverified_message_id": request.headers.get("upstash-message-id"),
        "unverified_retried": request.headers.get("upstash-retried"),
    }
    result = call_form(
        form_id,
        store=store,
        vapi=clients.vapi(config),
        publisher=partial(clients.publisher, config),
        call_form_url=config.CALL_FORM_URL,
        window=clients.window(config),
        delivery=delivery,
    )
    if result.status == "called":
        return Reply({"status": "called", "formId": form_id, "callId": result.call_id})
    if result.status == "deferred":
        return Reply(
            {
                "status": "deferred",
                "formId": form_id,
                "until": result.until.isoformat(),
                **({"reason": result.reason} if result.reason else {}),
            }
        )
    if result.status == "unknown":
        # Accepted: the sweep reconciles it against Vapi's call list; a retry could only skip.
        return Reply({"status": "unknown", "formId": form_id, "reason": result.reason}, 202)
    return Reply({"status": "skipped", "formId": form_id, "reason": result.reason})


app = create_app(handle, settings=CallFormSettings, paths=["/api/jobs/call-form"], methods=["POST"])
handler = lambda_handler(app)
