"""Settings validation and request parsing."""

import pytest

from formcall import settings
from formcall.errors import BadRequest, ConfigurationError
from formcall.models import CallFormRequest


@pytest.fixture(autouse=True)
def clean_settings(monkeypatch):
    for name in (
        "DATABASE_URL",
        "SUPABASE_URL",
        "NEXT_PUBLIC_SUPABASE_URL",
        "SUPABASE_SERVICE_ROLE_KEY",
        "VAPI_PRIVATE_KEY",
        "VAPI_ASSISTANT_ID",
        "VAPI_PHONE_NUMBER_ID",
        "VAPI_BASE_URL",
        "CRON_SECRET",
    ):
        monkeypatch.delenv(name, raising=False)
    settings.reset()
    yield
    settings.reset()


def test_database_needs_one_path(monkeypatch):
    with pytest.raises(ConfigurationError) as info:
        settings.load(settings.DatabaseSettings)
    assert info.value.names == ["SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY"]


def test_next_public_supabase_url_is_accepted(monkeypatch):
    monkeypatch.setenv("NEXT_PUBLIC_SUPABASE_URL", "https://proj.supabase.co")
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", "service-role")
    assert settings.load(settings.DatabaseSettings).SUPABASE_URL == "https://proj.supabase.co"


def test_database_url_alone_is_enough(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@h/db")
    assert settings.load(settings.DatabaseSettings).DATABASE_URL.get_secret_value()


def test_missing_vapi_settings_are_all_named(monkeypatch):
    monkeypatch.setenv("VAPI_BASE_URL", "ftp://nope")
    with pytest.raises(ConfigurationError) as info:
        settings.load(settings.VapiSettings)
    assert info.value.names == [
        "CALL_EVENTS_URL",
        "VAPI_ASSISTANT_ID",
        "VAPI_BASE_URL",
        "VAPI_PHONE_NUMBER_ID",
        "VAPI_PRIVATE_KEY",
        "VAPI_WEBHOOK_SECRET",
    ]


def test_short_cron_secret_is_refused(monkeypatch):
    monkeypatch.setenv("CRON_SECRET", "short")
    with pytest.raises(ConfigurationError) as info:
        settings.load(settings.CronSettings)
    assert info.value.names == ["CRON_SECRET"]


def test_secret_values_never_appear_in_the_error(monkeypatch):
    monkeypatch.setenv("CRON_SECRET", "s3cr3t")
    with pytest.raises(ConfigurationError) as info:
        settings.load(settings.CronSettings)
    assert "s3cr3t" not in str(info.value) and "s3cr3t" not in repr(info.value.detail)


def test_settings_are_read_once(monkeypatch):
    monkeypatch.setenv("CRON_SECRET", "x" * 20)
    first = settings.load(settings.CronSettings)
    monkeypatch.setenv("CRON_SECRET", "y" * 20)
    assert settings.load(settings.CronSettings) is first


@pytest.mark.parametrize(
    "body",
    [
        b'{"formId":"6f1c1b9e-2a53-4c1e-9d55-0a5b3f7f2c11"}',
        b'{"formId":"6F1C1B9E-2A53-4C1E-9D55-0A5B3F7F2C11","x":1}',
    ],
)
def test_form_request_parses(body):
    assert str(CallFormRequest.parse(body).formId) == "6f1c1b9e-2a53-4c1e-9d55-0a5b3f7f2c11"


@pytest.mark.parametrize(
    "body", [b"", b"nope", b"[]", b"{}", b'{"formId": null}', b'{"formId": "1"}', b"\xff\xfe"]
)
def test_form_request_refuses(body):
    with pytest.raises(BadRequest):
        CallFormRequest.parse(body)
