"""setup: run once after deploy; creates (or overwrites) the hourly check-forms schedule."""

from formcall import clients
from formcall.settings import SetupSettings
from formcall.sweep import ensure_check_forms_schedule
from formcall.web import Incoming, Reply, create_app, lambda_handler, require_cron_secret


def handle(request: Incoming, config: SetupSettings) -> Reply:
    require_cron_secret(request, secret=config.CRON_SECRET, allow_query=True)
    schedule = ensure_check_forms_schedule(
        publisher=clients.publisher(config), destination=config.CHECK_FORMS_URL
    )
    return Reply(
        {
            "success": True,
            "message": "hourly check-forms schedule is in place",
            "schedule": schedule,
        }
    )


app = create_app(handle, settings=SetupSettings, paths=["/api/setup-qstash"], methods=["GET"])
handler = lambda_handler(app)
