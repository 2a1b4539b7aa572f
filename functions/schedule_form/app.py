"""schedule-form: the signed webhooks of `forms` keep each form's one-time call message current."""

from formcall import clients, settings
from formcall.schedule import cancel_message, sync_form_schedule
from formcall.models import WebhookPayload
from formcall.web import Incoming, Reply, create_app, lambda_handler, require_signed_webhook


def handle(request: Incoming) -> Reply:
    require_signed_webhook(request)
    payload = WebhookPayload.parse(request.body)
    form_id = payload.form_id()
    if payload.schedule_unchanged():
        return Reply({"status": "unchanged", "formId": form_id})
    if payload.type == "DELETE":
        result = cancel_message(form_id, (payload.old_record or {}).get("qstash_message_id"),
                                store=clients.store(), publisher=clients.publisher())
    else:
        result = sync_form_schedule(
            form_id, store=clients.store(), publisher=clients.publisher(),
            call_form_url=settings.load(settings.CallFormUrlSettings).CALL_FORM_URL,
            window=clients.window())
    return Reply({"status": result.action, "formId": form_id, "messageId": result.message_id,
                  "notBefore": result.not_before.isoformat() if result.not_before else None})


app = create_app(handle, paths=["/api/webhooks/forms"], methods=["POST"])
handler = lambda_handler(app)
