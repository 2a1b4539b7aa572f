"""failure-callback: QStash reports a call-form message it gave up on; the form is marked failed."""

import json

from formcall import clients, settings
from formcall.errors import BadRequest
from formcall.failures import record_failed_delivery
from formcall.web import Incoming, Reply, create_app, lambda_handler, verify_qstash


def handle(request: Incoming) -> Reply:
    verify_qstash(
        request, public_url=settings.load(settings.CallPolicySettings).FAILURE_CALLBACK_URL
    )
    try:
        payload = json.loads(request.body)
    except (ValueError, RecursionError):  # RecursionError: nested too deep to parse
        raise BadRequest("body must be QStash's failure callback JSON") from None
    if not isinstance(payload, dict):
        raise BadRequest("body must be QStash's failure callback JSON")
    form_id, outcome = record_failed_delivery(payload, store=clients.store())
    return Reply({"status": "recorded", "formId": form_id, "callStatus": outcome})


app = create_app(handle, paths=["/api/jobs/failed"], methods=["POST"])
handler = lambda_handler(app)
