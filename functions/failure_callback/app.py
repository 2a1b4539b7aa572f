"""failure-callback: QStash reports a call-form message it gave up on; the form is marked failed."""

import json

from formcall import clients
from formcall.errors import BadRequest
from formcall.failures import record_failed_delivery
from formcall.settings import FailureCallbackSettings
from formcall.web import Incoming, Reply, create_app, lambda_handler, verify_qstash


def handle(request: Incoming, config: FailureCallbackSettings) -> Reply:
    store = clients.store(config)
    verify_qstash(request, keys=config, public_url=config.public_url, store=store)
    try:
        payload = json.loads(request.body)
    except (ValueError, RecursionError):  # RecursionError: nested too deep to parse
        raise BadRequest("body must be QStash's failure callback JSON") from None
    if not isinstance(payload, dict):
        raise BadRequest("body must be QStash's failure callback JSON")
    form_id, outcome = record_failed_delivery(payload, store=store)
    return Reply({"status": "recorded", "formId": form_id, "callStatus": outcome})


app = create_app(
    handle, settings=FailureCallbackSettings, paths=["/api/jobs/failed"], methods=["POST"]
)
handler = lambda_handler(app)
