"""A running local stack as `formcall dev` records it in its data folder (`.dev/stack.json`).

The operator commands read it for their settings when the environment does not give them;
the stack itself (formcall_dev.stack) writes it, so reading it needs none of the dev extra.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_DIR = Path(".dev")
STATE_FILE = "stack.json"


@dataclass
class StackInfo:
    """What a user (or `formcall status`) needs to reach a running stack."""

    dsn: str
    qstash_url: str
    functions_url: str
    vapi_url: str
    credentials: dict[str, str]
    real_vapi: bool = False
    # The dev stack calls at any hour unless told otherwise (`formcall dev --call-window`).
    call_window: str = "00:00-23:59:59"
    call_rules: dict[str, str] = field(default_factory=dict)
    # The local console (formcall_dev.console), on 127.0.0.1.
    console_url: str = ""
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def call_form_url(self) -> str:
        return f"{self.functions_url}/api/jobs/call-form"

    @property
    def check_forms_url(self) -> str:
        return f"{self.functions_url}/api/cron/check-forms"

    @property
    def setup_url(self) -> str:
        return f"{self.functions_url}/api/setup-qstash"

    @property
    def schedule_form_url(self) -> str:
        return f"{self.functions_url}/api/webhooks/forms"

    @property
    def failure_callback_url(self) -> str:
        return f"{self.functions_url}/api/jobs/failed"

    @property
    def call_events_url(self) -> str:
        return f"{self.functions_url}/api/webhooks/vapi"

    def env(self) -> dict[str, str]:
        """The formcall settings for this stack, as the functions read them."""
        return {
            "DATABASE_URL": self.dsn,
            "QSTASH_URL": self.qstash_url,
            "CALL_FORM_URL": self.call_form_url,
            "CHECK_FORMS_URL": self.check_forms_url,
            "FAILURE_CALLBACK_URL": self.failure_callback_url,
            "CALL_EVENTS_URL": self.call_events_url,
            "VAPI_BASE_URL": self.vapi_url,
            "CALL_WINDOW": self.call_window,
            **self.call_rules,
            **self.credentials,
        }


def load_info(data_dir: Path = DEFAULT_DIR) -> StackInfo | None:
    path = data_dir / STATE_FILE
    if not path.exists():
        return None
    return StackInfo(**json.loads(path.read_text()))
