"""The collaborators each function uses, built once per container on first use."""

from __future__ import annotations

from functools import cache

from formcall import settings
from formcall.store import FormStore, PostgresRpc, SupabaseRpc


@cache
def store() -> FormStore:
    config = settings.load(settings.DatabaseSettings)
    if config.DATABASE_URL is not None:
        rpc = PostgresRpc(config.DATABASE_URL.get_secret_value())
    else:
        rpc = SupabaseRpc(config.SUPABASE_URL, config.SUPABASE_SERVICE_ROLE_KEY.get_secret_value())
    return FormStore(rpc, max_attempts=config.MAX_CALL_ATTEMPTS)


@cache
def vapi():
    from formcall.vapi import VapiClient

    config = settings.load(settings.VapiSettings)
    return VapiClient(base_url=config.VAPI_BASE_URL,
                      api_key=config.VAPI_PRIVATE_KEY.get_secret_value(),
                      assistant_id=config.VAPI_ASSISTANT_ID,
                      phone_number_id=config.VAPI_PHONE_NUMBER_ID,
                      timeout=config.VAPI_TIMEOUT_SECONDS)


@cache
def publisher():
    from formcall.publisher import QStashPublisher

    config = settings.load(settings.PublisherSettings)
    return QStashPublisher(url=config.QSTASH_URL, token=config.QSTASH_TOKEN.get_secret_value())


def reset() -> None:
    """Forget clients and settings (tests; a container keeps them for its lifetime)."""
    for factory in (store, vapi, publisher):
        factory.cache_clear()
    settings.reset()
