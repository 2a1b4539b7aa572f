"""call-form: QStash delivers a form's deadline here; claim the form, call the patient, record it."""

from formcall import clients, settings
from formcall.call_form import call_form
from formcall.models import CallFormRequest
from formcall.web import Incoming, Reply, create_app, lambda_handler, verify_qstash


def handle(request: Incoming) -> Reply:
    claims = verify_qstash(request,
                           public_url=settings.load(settings.PublicUrlSettings).CALL_FORM_URL)
    form_id = str(CallFormRequest.parse(request.body).formId)
    delivery = {"message_id": request.headers.get("upstash-message-id"),
                "retried": request.headers.get("upstash-retried")}
    result = call_form(form_id, store=clients.store(), vapi=clients.vapi(),
                       window=clients.window(), publisher=clients.publisher,
                       self_url=claims["sub"], delivery=delivery)
    if result.status == "called":
        return Reply({"status": "called", "formId": form_id, "callId": result.call_id})
    if result.status == "deferred":
        return Reply({"status": "deferred", "formId": form_id, "until": result.until.isoformat(),
                      **({"reason": result.reason} if result.reason else {})})
    if result.status == "unknown":
        # Accepted: the sweep reconciles it against Vapi's call list; a retry could only skip.
        return Reply({"status": "unknown", "formId": form_id, "reason": result.reason}, 202)
    return Reply({"status": "skipped", "formId": form_id, "reason": result.reason})


app = create_app(handle, paths=["/api/jobs/call-form"], methods=["POST"])
handler = lambda_handler(app)
