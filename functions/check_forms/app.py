"""check-forms: the hourly sweep (QStash schedule, POST) and its manual trigger (GET, bearer)."""

from functools import partial

from formcall import clients
from formcall.settings import CheckFormsSettings
from formcall.sweep import sweep_overdue_forms
from formcall.web import (
    Incoming,
    Reply,
    create_app,
    lambda_handler,
    require_cron_secret,
    verify_qstash,
)


def handle(request: Incoming, config: CheckFormsSettings) -> Reply:
    store = clients.store(config)
    if request.method == "POST":
        verify_qstash(request, keys=config, public_url=config.public_url, store=store)
    else:
        require_cron_secret(request, secret=config.CRON_SECRET)
    report = sweep_overdue_forms(
        store=store,
        vapi=clients.vapi(config),
        publisher=partial(clients.publisher, config),
        call_form_url=config.CALL_FORM_URL,
        window=clients.window(config),
        outcome_timeout_seconds=config.CALL_OUTCOME_TIMEOUT_SECONDS,
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


app = create_app(
    handle, settings=CheckFormsSettings, paths=["/api/cron/check-forms"], methods=["GET", "POST"]
)
handler = lambda_handler(app)
