"""check-forms: the hourly sweep (QStash schedule, POST) and its manual trigger (GET, bearer)."""

from formcall import clients, settings
from formcall.sweep import sweep_overdue_forms
from formcall.web import (
    Incoming,
    Reply,
    create_app,
    lambda_handler,
    require_cron_secret,
    verify_qstash,
)


def handle(request: Incoming) -> Reply:
    if request.method == "POST":
        verify_qstash(request, public_url=settings.load(settings.PublicUrlSettings).CHECK_FORMS_URL)
    else:
        require_cron_secret(request)
    destination = settings.load(settings.CallFormUrlSettings).CALL_FORM_URL
    rules = settings.load(settings.CallRulesSettings)
    report = sweep_overdue_forms(
        store=clients.store(),
        vapi=clients.vapi(),
        publisher=clients.publisher,
        call_form_url=destination,
        window=clients.window(),
        outcome_timeout_seconds=rules.CALL_OUTCOME_TIMEOUT_SECONDS,
    )
    return Reply(
        {
            "success": True,
            "found": report.found,
            "enqueued": report.enqueued,
            "failed": report.failed,
            "reconciled": report.reconciled,
            "outcomes": report.outcomes,
        }
    )


app = create_app(handle, paths=["/api/cron/check-forms"], methods=["GET", "POST"])
handler = lambda_handler(app)
