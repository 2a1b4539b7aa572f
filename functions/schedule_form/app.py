"""schedule-form: the signed webhooks of `forms` keep each form's one-time call message current."""

from formcall import clients
from formcall.models import WebhookPayload
from formcall.schedule import cancel_message, sync_form_schedule
from formcall.settings import ScheduleFormSettings
from formcall.web import Incoming, Reply, create_app, lambda_handler, require_signed_webhook


def handle(request: Incoming, config: ScheduleFormSettings) -> Reply:
    require_signed_webhook(request, secret=config.WEBHOOK_SECRET)
    payload = WebhookPayload.parse(request.body)
    form_id = payload.form_id()
    if payload.schedule_unchanged():
        return Reply({"status": "unchanged", "formId": form_id})
    if payload.type == "DELETE":
        result = cancel_message(
            form_id,
            (payload.old_record or {}).get("qstash_message_id"),
            store=clients.store(config),
            publisher=clients.publisher(config),
        )
    else:
        result = sync_form_schedule(
            form_id,
            store=clients.store(config),
            publisher=clients.publisher(config),
            call_form_url=config.CALL_FORM_URL,
            window=clients.window(config),
        )
    return Reply(
        {
            "status": result.action,
            "formId": form_id,
            "messageId": result.message_id,
            "notBefore": result.not_before.isoformat() if result.not_before else None,
        }
    )


app = create_app(
    handle, settings=ScheduleFormSettings, paths=["/api/webhooks/forms"], methods=["POST"]
)
handler = lambda_handler(app)
