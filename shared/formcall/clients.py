"""The collaborators each function uses, built on first use and kept while their settings hold.

In AWS the settings come partly from the formcall secret, re-read after its max age: a client
whose settings changed (a rotated Vapi key or QStash token) is built again, the others are kept.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import TypeVar

from formcall import settings
from formcall.store import CallRules, FormStore, PostgresRpc, Rpc, SupabaseRpc

C = TypeVar("C")


def _built_from(*models: type) -> Callable[[Callable[[], C]], Callable[[], C]]:
    """Keep the client `build` makes until one of `models` (the settings it reads) changes."""

    def decorate(build: Callable[[], C]) -> Callable[[], C]:
        kept: list = []  # [(settings objects, client)] once built
        lock = threading.Lock()

        def get() -> C:
            current: list[object] = [settings.load(model) for model in models]
            with lock:
                if not kept or kept[0][0] != current:
                    kept[:] = [(current, build())]
                return kept[0][1]

        functools.update_wrapper(get, build)
        get.cache_clear = kept.clear  # type: ignore[attr-defined]
        get.models = models  # type: ignore[attr-defined]
        return get

    return decorate


@_built_from(settings.DatabaseSettings, settings.CallRulesSettings, settings.CallPolicySettings)
def store() -> FormStore:
    config = settings.load(settings.DatabaseSettings)
    rules = settings.load(settings.CallRulesSettings)
    policy = settings.load(settings.CallPolicySettings)
    rpc: Rpc
    if config.DATABASE_URL is not None:
        rpc = PostgresRpc(config.DATABASE_URL.get_secret_value())
    else:  # the settings' validator: both are set without DATABASE_URL
        assert config.SUPABASE_URL is not None and config.SUPABASE_SERVICE_ROLE_KEY is not None
        rpc = SupabaseRpc(config.SUPABASE_URL, config.SUPABASE_SERVICE_ROLE_KEY.get_secret_value())
    return FormStore(
        rpc,
        rules=CallRules(
            max_attempts=rules.MAX_CALL_ATTEMPTS,
            max_calls_per_form=rules.MAX_CALLS_PER_FORM,
            follow_up_on=rules.FOLLOW_UP_ON,
            follow_up_delay_seconds=rules.FOLLOW_UP_DELAY_SECONDS,
            max_per_day=rules.PATIENT_MAX_CALLS_PER_DAY,
            max_per_week=rules.PATIENT_MAX_CALLS_PER_WEEK,
            lines=policy.ledger_lines(),
            max_call_seconds=policy.VAPI_MAX_CALL_SECONDS,
            lease_seconds=rules.CLAIM_LEASE_SECONDS,
        ),
    )


@_built_from(settings.VapiSettings)
def vapi():
    from formcall.vapi import VapiClient, server_override

    config = settings.load(settings.VapiSettings)
    return VapiClient(
        base_url=config.VAPI_BASE_URL,
        api_key=config.VAPI_PRIVATE_KEY.get_secret_value(),
        assistant_id=config.VAPI_ASSISTANT_ID,
        phone_number_id=config.VAPI_PHONE_NUMBER_ID,
        timeout=config.VAPI_TIMEOUT_SECONDS,
        server=server_override(
            url=config.CALL_EVENTS_URL,
            secret=config.VAPI_WEBHOOK_SECRET.get_secret_value(),
            credential_id=config.VAPI_SERVER_CREDENTIAL_ID,
        ),
    )


@_built_from(settings.PublisherSettings, settings.CallPolicySettings)
def publisher():
    from formcall.publisher import QStashPublisher, flow_control

    config = settings.load(settings.PublisherSettings)
    policy = settings.load(settings.CallPolicySettings)
    return QStashPublisher(
        url=config.QSTASH_URL,
        token=config.QSTASH_TOKEN.get_secret_value(),
        failure_callback_url=policy.FAILURE_CALLBACK_URL,
        flow=flow_control(
            policy.VAPI_MAX_CONCURRENCY,
            policy.VAPI_CALLS_PER_MINUTE,
            ledger=policy.ledger_lines() is not None,
        ),
    )


@_built_from(settings.CallPolicySettings)
def window():
    from formcall.errors import ConfigurationError
    from formcall.window import parse_window

    text = settings.load(settings.CallPolicySettings).CALL_WINDOW
    try:
        return parse_window(text)
    except ValueError as exc:
        raise ConfigurationError(["CALL_WINDOW"], f"CALL_WINDOW is malformed: {exc}") from None


def reset() -> None:
    """Forget clients and settings (tests; a container keeps them for its lifetime)."""
    for factory in (store, vapi, publisher, window):
        factory.cache_clear()  # type: ignore[union-attr]
    settings.reset()
