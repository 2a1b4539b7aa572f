"""setup: run once after deploy; creates (or overwrites) the hourly check-forms schedule."""

from formcall import clients, settings
from formcall.sweep import ensure_check_forms_schedule
from formcall.web import Incoming, Reply, create_app, lambda_handler, require_cron_secret


def handle(request: Incoming) -> Reply:
    require_cron_secret(request, allow_query=True)
    destination = settings.load(settings.CheckFormsUrlSettings).CHECK_FORMS_URL
    schedule = ensure_check_forms_schedule(publisher=clients.publisher(), destination=destination)
    return Reply(
        {
            "success": True,
            "message": "hourly check-forms schedule is in place",
            "schedule": schedule,
        }
    )


app = create_app(handle, paths=["/api/setup-qstash"], methods=["GET"])
handler = lambda_handler(app)
