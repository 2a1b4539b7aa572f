"""Settings from the formcall secret in Secrets Manager (moto): read, cached, rotated, refused.

The functions run through their Lambda handlers on real signed events against the real
database and the fake Vapi; only AWS is moto. GetSecretValue calls are counted with a botocore
event hook, so nothing of formcall or Powertools is mocked.
"""

from __future__ import annotations

import json
import secrets as random
import subprocess
import sys
import time
from pathlib import Path

import boto3
import botocore.handlers
import pytest
from moto import mock_aws

from formcall import clients, settings
from formcall.errors import ConfigurationError
from formcall.secrets import SECRET_GROUPS, SECRET_SETTINGS
from formcall_dev.polling import wait_until
from tests.support.lambda_handlers import call_form_event, invoke
from tests.support.reads import form_events, form_row

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def get_secret_value_calls(secret_read_times):
    """Every GetSecretValue any boto3 client makes (new sessions pick up BUILTIN_HANDLERS)."""
    calls: list[str] = []

    def record(params, **_):
        calls.append(params["SecretId"])
        secret_read_times.append(time.monotonic())

    hook = ("before-parameter-build.secrets-manager.GetSecretValue", record)
    botocore.handlers.BUILTIN_HANDLERS.append(hook)
    yield calls
    botocore.handlers.BUILTIN_HANDLERS.remove(hook)


@pytest.fixture
def secret_read_times() -> list[float]:
    """When each GetSecretValue was made (time.monotonic()), filled by get_secret_value_calls."""
    return []


@pytest.fixture
def logged(caplog):
    """What formcall logged, as the JSON lines Powertools writes."""
    from formcall.observability import logger

    def lines() -> list[dict]:
        formatter = logger.registered_formatter
        return [json.loads(formatter.format(r)) for r in caplog.records if r.name == "formcall"]

    return lines


@pytest.fixture
def aws(get_secret_value_calls):
    with mock_aws():
        clients.reset()  # Powertools' provider (and its boto3 client) is made inside the mock
        yield boto3.client("secretsmanager", region_name="us-east-1")
        clients.reset()


@pytest.fixture
def in_secret(env, aws, monkeypatch):
    """The secret settings moved from the environment into one secret; returns a helper."""
    values = {name: env[name] for name in SECRET_SETTINGS if name in env}
    values["WEBHOOK_SECRET"] = random.token_urlsafe(24)
    for name in values:
        monkeypatch.delenv(name, raising=False)

    class Secret:
        arn = aws.create_secret(Name="formcall/test", SecretString=json.dumps(values))["ARN"]
        current = dict(values)

        @classmethod
        def use(cls, max_age: int = 300, arn: str | None = None) -> None:
            monkeypatch.setenv("FORMCALL_SECRET_ARN", arn or cls.arn)
            monkeypatch.setenv("FORMCALL_SECRET_MAX_AGE", str(max_age))
            clients.reset()

        @classmethod
        def rotate(cls, **changes: str | None) -> None:
            cls.current = {k: v for k, v in {**cls.current, **changes}.items() if v is not None}
            aws.put_secret_value(SecretId=cls.arn, SecretString=json.dumps(cls.current))

    return Secret


def test_settings_come_from_the_secret(
    in_secret, vapi, conn, due_form, keys, get_secret_value_calls
):
    in_secret.use()

    answer = invoke("call_form", call_form_event(due_form, key=keys.current_key))

    assert (answer.status, answer.body["status"]) == (200, "called")
    assert form_row(conn, due_form)["call_status"] == "called"
    assert get_secret_value_calls == [in_secret.arn]
    assert settings.load(settings.CronSettings).CRON_SECRET.get_secret_value() == keys.cron_secret


def test_the_secret_is_read_once_per_max_age(
    in_secret, vapi, conn, keys, due_form, get_secret_value_calls
):
    in_secret.use(max_age=300)

    for _ in range(3):
        assert invoke("call_form", call_form_event(due_form, key=keys.current_key)).status == 200
    for model in (
        settings.ReceiverSettings,
        settings.VapiSettings,
        settings.DatabaseSettings,
        settings.PublisherSettings,
        settings.CronSettings,
        settings.WebhookSettings,
    ):
        settings.load(model)

    assert get_secret_value_calls == [in_secret.arn]
    assert len(vapi.calls_for_form(due_form)) == 1


def test_a_rotated_signing_key_is_picked_up_after_max_age(
    in_secret, vapi, conn, keys, due_form, get_secret_value_calls, secret_read_times
):
    in_secret.use(max_age=1)
    new_key = "sig_" + random.token_urlsafe(21)
    assert invoke("call_form", call_form_event(due_form, key=new_key)).status == 401

    in_secret.rotate(QSTASH_CURRENT_SIGNING_KEY=new_key)
    # Until the cached value expires the old keys still hold (no redeploy, no restart either);
    # then the next request reads the secret again and takes the rotated key.
    tried: list[tuple[int, int]] = []  # (status, secret reads so far) per request

    def rotated_key_taken() -> bool:
        answer = invoke("call_form", call_form_event(due_form, key=new_key))
        tried.append((answer.status, len(get_secret_value_calls)))
        return answer.status == 200 and answer.body["status"] == "called"

    wait_until(rotated_key_taken, timeout=30, interval=0.1)

    assert tried[-1] == (200, 2)
    assert all(attempt == (401, 1) for attempt in tried[:-1])  # cached: one read, old keys
    # Read again only once the cached value was max age old (Powertools' wall clock; 10 ms of
    # slack between its clock and this one).
    assert secret_read_times[1] - secret_read_times[0] >= 1 - 0.01
    assert invoke("call_form", call_form_event(due_form, key=keys.current_key)).status == 401


def call_form_clients() -> tuple:
    """call-form's Vapi client, store and publisher, built from its settings as a request does."""
    config = settings.load(settings.CallFormSettings)
    return clients.vapi(config), clients.store(config), clients.publisher(config)


def test_clients_are_rebuilt_only_when_their_settings_change(in_secret, vapi, conn, keys, due_form):
    in_secret.use(max_age=1)
    first_vapi, first_store, first_publisher = call_form_clients()

    in_secret.rotate(CRON_SECRET=random.token_urlsafe(24))
    wait_until(
        lambda: (
            settings.load(settings.CronSettings).CRON_SECRET.get_secret_value()
            == in_secret.current["CRON_SECRET"]
        ),
        timeout=30,
    )
    assert call_form_clients() == (first_vapi, first_store, first_publisher)

    new_vapi_key, new_token = random.token_urlsafe(24), random.token_urlsafe(24)
    in_secret.rotate(VAPI_PRIVATE_KEY=new_vapi_key, QSTASH_TOKEN=new_token)
    vapi.api_key = new_vapi_key  # Vapi now only accepts the rotated key
    wait_until(
        lambda: (
            settings.load(settings.VapiSettings).VAPI_PRIVATE_KEY.get_secret_value() == new_vapi_key
        ),
        timeout=30,
    )
    answer = invoke("call_form", call_form_event(due_form, key=keys.current_key))

    assert (answer.status, answer.body["status"]) == (200, "called")
    vapi_now, store_now, publisher_now = call_form_clients()
    assert vapi_now is not first_vapi and publisher_now is not first_publisher
    assert store_now is first_store


BROKEN = {
    # case: (secret string or None for "no such secret", settings named in the 500)
    "missing": (None, ["FORMCALL_SECRET_ARN"]),
    "not JSON": ("{QSTASH_TOKEN: nope", ["FORMCALL_SECRET_ARN"]),
    "not an object": ('["QSTASH_TOKEN"]', ["FORMCALL_SECRET_ARN"]),
    "no signing key": ({"QSTASH_CURRENT_SIGNING_KEY": None}, ["QSTASH_CURRENT_SIGNING_KEY"]),
    "empty placeholder": ({"QSTASH_NEXT_SIGNING_KEY": ""}, ["QSTASH_NEXT_SIGNING_KEY"]),
    # call-form's settings are loaded whole before anything is read: the Vapi key too.
    "no Vapi key": ({"VAPI_PRIVATE_KEY": None}, ["VAPI_PRIVATE_KEY"]),
    "nested value": ({"VAPI_PRIVATE_KEY": {"key": "x"}}, ["VAPI_PRIVATE_KEY"]),
}


@pytest.mark.parametrize("case", BROKEN)
def test_an_unusable_secret_answers_500_naming_it_and_nothing_happens(
    case, in_secret, aws, vapi, conn, keys, due_form, logged
):
    content, named = BROKEN[case]
    arn = None
    if content is None:
        arn = in_secret.arn.replace("formcall/test", "formcall/gone")
    elif isinstance(content, str):
        aws.put_secret_value(SecretId=in_secret.arn, SecretString=content)
    else:
        values = {k: v for k, v in {**in_secret.current, **content}.items() if v is not None}
        aws.put_secret_value(SecretId=in_secret.arn, SecretString=json.dumps(values))
    in_secret.use(arn=arn)
    before = form_row(conn, due_form)

    answer = invoke("call_form", call_form_event(due_form, key=keys.current_key))

    assert answer.status == 500
    assert answer.body["settings"] == named
    assert vapi.requests == []
    assert form_row(conn, due_form) == before and form_events(conn, due_form) == []
    lines = logged()
    assert [line["settings"] for line in lines if line["message"] == "request refused"] == [named]
    text = json.dumps(lines) + json.dumps(answer.body)
    assert not [name for name, value in in_secret.current.items() if value in text]


def test_unreadable_secret_logs_the_aws_error_code(in_secret, vapi, due_form, keys, logged):
    in_secret.use(arn=in_secret.arn.replace("formcall/test", "formcall/gone"))

    invoke("call_form", call_form_event(due_form, key=keys.current_key))

    (refused,) = [line for line in logged() if line["message"] == "request refused"]
    assert refused["cause"] == "ResourceNotFoundException"


def test_malformed_max_age_is_named(in_secret, monkeypatch):
    in_secret.use()
    monkeypatch.setenv("FORMCALL_SECRET_MAX_AGE", "five minutes")

    with pytest.raises(ConfigurationError) as raised:
        settings.load(settings.CronSettings)

    assert raised.value.names == ["FORMCALL_SECRET_MAX_AGE"]


def test_without_a_secret_arn_powertools_parameters_is_never_imported():
    code = (
        "import os, sys; os.environ['CRON_SECRET'] = 'x' * 20; "
        "from formcall import settings, clients; "
        "settings.load(settings.CronSettings); "
        "print('aws_lambda_powertools.utilities.parameters' in sys.modules, 'boto3' in sys.modules)"
    )
    env = {
        k: v
        for k, v in __import__("os").environ.items()
        if k not in ("FORMCALL_SECRET_ARN", "FORMCALL_SECRET_ARNS")
    }
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
        check=True,
    )

    assert done.stdout.split() == ["False", "False"]


# --- call-form's own URL from SSM (CALL_FORM_URL_PARAMETER) -------------------------------------


def test_call_form_reads_its_own_url_from_the_ssm_parameter(
    env, aws, monkeypatch, conn, due_form, keys, vapi
):
    monkeypatch.delenv("CALL_FORM_URL")
    monkeypatch.setenv("CALL_FORM_URL_PARAMETER", "/formcall-test/call-form-url")
    boto3.client("ssm", region_name="us-east-1").put_parameter(
        Name="/formcall-test/call-form-url", Type="String", Value=env["CALL_FORM_URL"]
    )
    clients.reset()
    assert settings.load(settings.CallFormSettings).CALL_FORM_URL == env["CALL_FORM_URL"]
    answer = invoke("call_form", call_form_event(due_form, key=keys.current_key))
    assert answer.body["status"] == "called"


def test_an_unreadable_url_parameter_is_a_named_configuration_error(
    env, aws, monkeypatch, conn, due_form, keys, vapi
):
    monkeypatch.delenv("CALL_FORM_URL")
    monkeypatch.setenv("CALL_FORM_URL_PARAMETER", "/formcall-test/missing")
    clients.reset()
    answer = invoke("call_form", call_form_event(due_form, key=keys.current_key))
    assert answer.status == 500
    assert answer.body["settings"] == ["CALL_FORM_URL_PARAMETER"]
    assert vapi.requests == [] and form_row(conn, due_form)["call_status"] == "pending"


# --- The secrets split by what they guard (issue 14, finding 7) -------------------------------

# call-form's secrets, as template.yaml gives it (tests/integration/test_sam.py checks that).
CALL_FORM_SECRETS = [
    "DatabaseSecret",
    "SigningKeysSecret",
    "QStashTokenSecret",
    "VapiKeySecret",
    "VapiWebhookSecret",
]


@pytest.fixture
def split(env, aws, monkeypatch):
    """One moto secret per SECRET_GROUPS entry, the settings moved out of the environment."""
    values = {name: env[name] for name in SECRET_SETTINGS if name in env}
    values |= {
        "WEBHOOK_SECRET": random.token_urlsafe(24),
        "VAPI_WEBHOOK_SECRET": random.token_urlsafe(24),
    }
    for name in values:
        monkeypatch.delenv(name, raising=False)
    arns = {
        group: aws.create_secret(
            Name=f"formcall/test/{group}",
            SecretString=json.dumps({k: values[k] for k in keys if k in values}),
        )["ARN"]
        for group, keys in SECRET_GROUPS.items()
    }

    def use(groups: list[str]) -> list[str]:
        chosen = [arns[g] for g in groups]
        monkeypatch.setenv("FORMCALL_SECRET_ARNS", ",".join(chosen))
        clients.reset()
        return chosen

    use.arns = arns  # type: ignore[attr-defined]
    return use


def test_a_function_reads_each_of_its_secrets_once(
    split, vapi, conn, due_form, keys, get_secret_value_calls
):
    arns = split(CALL_FORM_SECRETS)

    for _ in range(2):
        assert invoke("call_form", call_form_event(due_form, key=keys.current_key)).status == 200

    assert form_row(conn, due_form)["call_status"] == "called"
    assert sorted(get_secret_value_calls) == sorted(arns)


def test_a_function_cannot_see_the_secrets_it_was_not_given(split, vapi, conn, due_form, keys):
    # call-form is not given the cron or webhook secrets: they are simply not there.
    split(CALL_FORM_SECRETS)
    assert invoke("call_form", call_form_event(due_form, key=keys.current_key)).status == 200
    for model, name in (
        (settings.CronSettings, "CRON_SECRET"),
        (settings.WebhookSettings, "WEBHOOK_SECRET"),
    ):
        with pytest.raises(ConfigurationError) as raised:
            settings.load(model)
        assert raised.value.names == [name]


def test_rotating_one_secret_rebuilds_only_the_client_that_reads_it(
    split, aws, vapi, keys, due_form, monkeypatch
):
    split(CALL_FORM_SECRETS)
    monkeypatch.setenv("FORMCALL_SECRET_MAX_AGE", "0")
    caller, store, _ = call_form_clients()
    new_key = random.token_urlsafe(24)
    aws.put_secret_value(
        SecretId=split.arns["VapiKeySecret"], SecretString=json.dumps({"VAPI_PRIVATE_KEY": new_key})
    )
    vapi.api_key = new_key

    answer = invoke("call_form", call_form_event(due_form, key=keys.current_key))

    assert (answer.status, answer.body["status"]) == (200, "called")
    caller_now, store_now, _ = call_form_clients()
    assert caller_now is not caller and store_now is store


def test_one_unreadable_secret_among_several_answers_500_naming_the_list(
    split, vapi, conn, due_form, keys, monkeypatch
):
    arns = split(CALL_FORM_SECRETS)
    gone = arns[0].replace("DatabaseSecret", "GoneSecret")
    monkeypatch.setenv("FORMCALL_SECRET_ARNS", ",".join([gone, *arns[1:]]))
    clients.reset()

    answer = invoke("call_form", call_form_event(due_form, key=keys.current_key))

    assert (answer.status, answer.body["settings"]) == (500, ["FORMCALL_SECRET_ARNS"])
    assert vapi.requests == [] and form_events(conn, due_form) == []
