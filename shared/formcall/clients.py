"""The collaborators each function uses, built from its settings and kept while those hold.

Each factory takes the function's settings (loaded once per request at the edge) and keeps
its client while the values it is built from are unchanged: in AWS part of them come from the
formcall secrets, re-read after their max age, so a rotated Vapi key or QStash token rebuilds
that one client and the others are kept.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from formcall.settings import (
    CallCapsSettings,
    CallWindowSettings,
    ClaimLeaseSettings,
    DatabaseSettings,
    FailureCallbackUrlSettings,
    FlowControlSettings,
    FollowUpSettings,
    LineLedgerSettings,
    PublisherSettings,
    VapiSettings,
)
from formcall.store import CallRules, FormStore, PostgresRpc, Rpc, SupabaseRpc

if TYPE_CHECKING:
    from formcall.publisher import QStashPublisher
    from formcall.vapi import VapiClient
    from formcall.window import CallWindow

# (client, function settings model) -> (what it was built from, the client). Keyed on the
# model too, so the dev server's functions, one process, keep one client each as on Lambda.
_kept: dict[tuple[str, type], tuple[tuple, object]] = {}
_lock = threading.Lock()


def _keep[C](name: str, config: object, build: Callable[..., C], *built_from: object) -> C:
    """`build(*built_from)`, kept until `built_from` changes: a client sees nothing else."""
    key = (name, type(config))
    with _lock:
        kept = _kept.get(key)
        if kept is None or kept[0] != built_from:
            kept = (built_from, build(*built_from))
            _kept[key] = kept
        return kept[1]  # type: ignore[return-value]


def call_rules(config: object) -> CallRules:
    """The limits the store passes to SQL, each from its concern where the function has it.

    A function without a concern never runs the SQL that reads it (schedule-form claims
    nothing), so CallRules' defaults stand in unused.
    """
    rules: dict = {}
    if isinstance(config, CallCapsSettings):
        rules |= {
            "max_attempts": config.MAX_CALL_ATTEMPTS,
            "max_per_day": config.PATIENT_MAX_CALLS_PER_DAY,
            "max_per_week": config.PATIENT_MAX_CALLS_PER_WEEK,
        }
    if isinstance(config, FollowUpSettings):
        rules |= {
            "max_calls_per_form": config.MAX_CALLS_PER_FORM,
            "follow_up_on": config.FOLLOW_UP_ON,
            "follow_up_delay_seconds": config.FOLLOW_UP_DELAY_SECONDS,
        }
    if isinstance(config, LineLedgerSettings):
        rules |= {"lines": config.ledger_lines(), "max_call_seconds": config.VAPI_MAX_CALL_SECONDS}
    if isinstance(config, ClaimLeaseSettings):
        rules["lease_seconds"] = config.CLAIM_LEASE_SECONDS
    return CallRules(**rules)


def store(config: DatabaseSettings) -> FormStore:
    return _keep(
        "store",
        config,
        _build_store,
        config.DATABASE_URL,
        config.SUPABASE_URL,
        config.SUPABASE_SERVICE_ROLE_KEY,
        call_rules(config),
    )


def _build_store(database_url, supabase_url, service_role_key, rules: CallRules) -> FormStore:
    rpc: Rpc
    if database_url is not None:
        rpc = PostgresRpc(database_url.get_secret_value())
    else:  # DatabaseSettings' validator: both are set without DATABASE_URL
        assert supabase_url is not None and service_role_key is not None
        rpc = SupabaseRpc(supabase_url, service_role_key.get_secret_value())
    return FormStore(rpc, rules=rules)


def vapi(config: VapiSettings) -> VapiClient:
    return _keep(
        "vapi",
        config,
        _build_vapi,
        config.VAPI_BASE_URL,
        config.VAPI_PRIVATE_KEY,
        config.VAPI_ASSISTANT_ID,
        config.VAPI_PHONE_NUMBER_ID,
        config.VAPI_TIMEOUT_SECONDS,
        config.CALL_EVENTS_URL,
        config.VAPI_WEBHOOK_SECRET,
        config.VAPI_SERVER_CREDENTIAL_ID,
    )


def _build_vapi(
    base_url, api_key, assistant_id, phone_number_id, timeout, events_url, secret, credential_id
) -> VapiClient:
    from formcall.vapi import VapiClient, server_override

    return VapiClient(
        base_url=base_url,
        api_key=api_key.get_secret_value(),
        assistant_id=assistant_id,
        phone_number_id=phone_number_id,
        timeout=timeout,
        server=server_override(
            url=events_url, secret=secret.get_secret_value(), credential_id=credential_id
        ),
    )


def publisher(config: PublisherSettings) -> QStashPublisher:
    """The QStash publisher; call-form messages carry flow control and the failure callback
    where the function publishes them (setup publishes only the schedule)."""
    flow = None
    if isinstance(config, FlowControlSettings):
        flow = (config.VAPI_MAX_CONCURRENCY, config.VAPI_CALLS_PER_MINUTE, config.VAPI_LINE_LEDGER)
    callback = (
        config.FAILURE_CALLBACK_URL if isinstance(config, FailureCallbackUrlSettings) else None
    )
    return _keep(
        "publisher",
        config,
        _build_publisher,
        config.QSTASH_URL,
        config.QSTASH_TOKEN,
        callback,
        flow,
    )


def _build_publisher(url, token, failure_callback_url, flow) -> QStashPublisher:
    from formcall.publisher import QStashPublisher, flow_control

    return QStashPublisher(
        url=url,
        token=token.get_secret_value(),
        failure_callback_url=failure_callback_url,
        flow=None if flow is None else flow_control(flow[0], flow[1], ledger=flow[2]),
    )


def window(config: CallWindowSettings) -> CallWindow:
    from formcall.window import parse_window

    # CallWindowSettings' validator parsed it already: this cannot raise.
    return _keep("window", config, parse_window, config.CALL_WINDOW)


def reset() -> None:
    """Forget clients and settings (tests; a container keeps them for its lifetime)."""
    from formcall import settings

    with _lock:
        _kept.clear()
    settings.reset()
