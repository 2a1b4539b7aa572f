"""Each function's settings model: what it requires, its concerns' validators, how it is loaded.

And the clients built from it: each kept while the values it is built from hold, rebuilt when
one of them changes (a rotated key), whatever else changes.
"""

from __future__ import annotations

import pytest

from formcall import clients, settings
from formcall.errors import ConfigurationError
from formcall.settings import FUNCTION_SETTINGS

URL = "https://fn.example.com/"
SECRET = "s" * 20
# The values each function cannot start without (DATABASE_URL: one of the two database paths).
REQUIRED = {
    "call_form": {
        "QSTASH_CURRENT_SIGNING_KEY": SECRET,
        "QSTASH_NEXT_SIGNING_KEY": SECRET,
        "QSTASH_TOKEN": SECRET,
        "DATABASE_URL": "postgresql://u@127.0.0.1:1/db",
        "VAPI_PRIVATE_KEY": SECRET,
        "VAPI_ASSISTANT_ID": "asst",
        "VAPI_PHONE_NUMBER_ID": "phone",
        "VAPI_WEBHOOK_SECRET": SECRET,
        "CALL_EVENTS_URL": URL,
        "CALL_FORM_URL": URL,
    },
    "check_forms": {
        "QSTASH_CURRENT_SIGNING_KEY": SECRET,
        "QSTASH_NEXT_SIGNING_KEY": SECRET,
        "CRON_SECRET": SECRET,
        "QSTASH_TOKEN": SECRET,
        "DATABASE_URL": "postgresql://u@127.0.0.1:1/db",
        "VAPI_PRIVATE_KEY": SECRET,
        "VAPI_ASSISTANT_ID": "asst",
        "VAPI_PHONE_NUMBER_ID": "phone",
        "VAPI_WEBHOOK_SECRET": SECRET,
        "CALL_EVENTS_URL": URL,
        "CALL_FORM_URL": URL,
    },
    "setup": {"CRON_SECRET": SECRET, "QSTASH_TOKEN": SECRET, "CHECK_FORMS_URL": URL},
    "schedule_form": {
        "WEBHOOK_SECRET": SECRET,
        "QSTASH_TOKEN": SECRET,
        "DATABASE_URL": "postgresql://u@127.0.0.1:1/db",
        "CALL_FORM_URL": URL,
    },
    "failure_callback": {
        "QSTASH_CURRENT_SIGNING_KEY": SECRET,
        "QSTASH_NEXT_SIGNING_KEY": SECRET,
        "DATABASE_URL": "postgresql://u@127.0.0.1:1/db",
    },
    "call_events": {
        "VAPI_WEBHOOK_SECRET": SECRET,
        "QSTASH_TOKEN": SECRET,
        "DATABASE_URL": "postgresql://u@127.0.0.1:1/db",
        "CALL_FORM_URL": URL,
    },
}


@pytest.fixture(autouse=True)
def no_settings(monkeypatch):
    """Nothing from the machine's environment: each test sets what it means to."""
    names = {name for model in FUNCTION_SETTINGS.values() for name in model.model_fields}
    for name in names | {"NEXT_PUBLIC_SUPABASE_URL", "FORMCALL_SECRET_ARN", "FORMCALL_SECRET_ARNS"}:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("CALL_FORM_URL_PARAMETER", raising=False)
    clients.reset()
    yield
    clients.reset()


def given(monkeypatch, values: dict[str, str]) -> None:
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    settings.reset()


def test_every_function_has_a_model_and_a_list_of_what_it_requires():
    assert set(REQUIRED) == set(FUNCTION_SETTINGS)


@pytest.mark.parametrize("function", REQUIRED)
def test_a_function_starts_with_exactly_its_required_settings(monkeypatch, function):
    given(monkeypatch, REQUIRED[function])
    config = settings.load(FUNCTION_SETTINGS[function])
    assert {n for n in REQUIRED[function] if getattr(config, n) is None} == set()


@pytest.mark.parametrize(
    "function, missing", [(f, n) for f, values in REQUIRED.items() for n in values]
)
def test_each_required_setting_missing_is_named(monkeypatch, function, missing):
    given(monkeypatch, {k: v for k, v in REQUIRED[function].items() if k != missing})
    with pytest.raises(ConfigurationError) as raised:
        settings.load(FUNCTION_SETTINGS[function])
    named = (
        ["SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY"] if missing == "DATABASE_URL" else [missing]
    )
    assert raised.value.names == named


def test_every_missing_field_is_named_at_once(monkeypatch):
    given(monkeypatch, {"CALL_FORM_URL": URL})
    with pytest.raises(ConfigurationError) as raised:
        settings.load(settings.CallEventsSettings)
    assert raised.value.names == ["QSTASH_TOKEN", "VAPI_WEBHOOK_SECRET"]


def test_setup_requires_check_forms_url_which_check_forms_itself_may_go_without(monkeypatch):
    # check-forms' own URL is only an extra signed subject (behind the edge); setup's schedule
    # points there. A blank value (a template default) counts as unset in both.
    given(monkeypatch, {**REQUIRED["check_forms"], "CHECK_FORMS_URL": ""})
    assert settings.load(settings.CheckFormsSettings).public_url is None
    given(monkeypatch, {**REQUIRED["setup"], "CHECK_FORMS_URL": ""})
    with pytest.raises(ConfigurationError) as raised:
        settings.load(settings.SetupSettings)
    assert raised.value.names == ["CHECK_FORMS_URL"]


def test_public_urls_are_each_functions_own(monkeypatch):
    given(monkeypatch, REQUIRED["call_form"])
    assert settings.load(settings.CallFormSettings).public_url == URL
    given(monkeypatch, {**REQUIRED["failure_callback"], "FAILURE_CALLBACK_URL": URL + "failed"})
    assert settings.load(settings.FailureCallbackSettings).public_url == URL + "failed"


def test_blank_optional_settings_are_unset(monkeypatch):
    given(
        monkeypatch,
        {
            **REQUIRED["call_events"],
            "VAPI_SERVER_CREDENTIAL_ID": "",
            "FAILURE_CALLBACK_URL": "",
            "SUPABASE_URL": "",
        },
    )
    config = settings.load(settings.CallEventsSettings)
    assert (config.VAPI_SERVER_CREDENTIAL_ID, config.FAILURE_CALLBACK_URL) == (None, None)
    assert config.SUPABASE_URL is None


@pytest.mark.parametrize(
    "function, values, named",
    [
        ("call_events", {"FOLLOW_UP_ON": "no_answer,reached"}, ["FOLLOW_UP_ON"]),
        (
            "call_form",
            {"PATIENT_MAX_CALLS_PER_DAY": "4", "PATIENT_MAX_CALLS_PER_WEEK": "3"},
            ["PATIENT_MAX_CALLS_PER_DAY", "PATIENT_MAX_CALLS_PER_WEEK"],
        ),
        (
            "call_events",
            {"VAPI_MAX_CONCURRENCY": "2", "VAPI_RESERVED_LINES": "2"},
            ["VAPI_RESERVED_LINES", "VAPI_MAX_CONCURRENCY"],
        ),
        ("schedule_form", {"CALL_WINDOW": "20:00-09:00"}, ["CALL_WINDOW"]),
        ("call_form", {"CALL_WINDOW": ""}, ["CALL_WINDOW"]),
        ("check_forms", {"VAPI_BASE_URL": "ftp://nope"}, ["VAPI_BASE_URL"]),
        ("setup", {"QSTASH_URL": "not a url"}, ["QSTASH_URL"]),
    ],
)
def test_the_concerns_validators_hold_in_every_function(monkeypatch, function, values, named):
    given(monkeypatch, {**REQUIRED[function], **values})
    with pytest.raises(ConfigurationError) as raised:
        settings.load(FUNCTION_SETTINGS[function])
    assert raised.value.names == named


def test_follow_up_on_is_a_set_of_outcomes(monkeypatch):
    given(monkeypatch, {**REQUIRED["check_forms"], "FOLLOW_UP_ON": " busy , voicemail,"})
    assert settings.load(settings.CheckFormsSettings).FOLLOW_UP_ON == {"busy", "voicemail"}
    given(monkeypatch, {**REQUIRED["check_forms"], "FOLLOW_UP_ON": ""})
    assert settings.load(settings.CheckFormsSettings).FOLLOW_UP_ON == frozenset()


def test_a_model_is_validated_once_and_the_counters_say_so(monkeypatch):
    given(monkeypatch, REQUIRED["setup"])
    first = settings.load(settings.SetupSettings)
    monkeypatch.setenv("CRON_SECRET", "t" * 20)  # the environment is read once per container
    assert settings.load(settings.SetupSettings) is first
    assert settings.loads == {"SetupSettings": 2}
    assert settings.validations == {"SetupSettings": 1}


def test_a_secret_value_never_appears_in_the_error(monkeypatch):
    given(monkeypatch, {**REQUIRED["setup"], "CRON_SECRET": "s3cr3t"})
    with pytest.raises(ConfigurationError) as raised:
        settings.load(settings.SetupSettings)
    assert raised.value.names == ["CRON_SECRET"]
    assert "s3cr3t" not in str(raised.value) and "s3cr3t" not in repr(raised.value.detail)


# --- Clients: kept while what they are built from holds ---------------------------------------

# Another valid value for every call-form setting, and the clients it must rebuild.
CHANGES = {
    "QSTASH_CURRENT_SIGNING_KEY": ("k" * 20, set()),  # read by web.verify_qstash, no client
    "QSTASH_NEXT_SIGNING_KEY": ("k" * 20, set()),
    "QSTASH_CLOCK_TOLERANCE": ("9", set()),
    "QSTASH_URL": ("https://qstash.example.com", {"publisher"}),
    "QSTASH_TOKEN": ("rotated-token", {"publisher"}),
    "DATABASE_URL": ("postgresql://u@127.0.0.1:2/db", {"store"}),
    "SUPABASE_URL": ("https://proj.supabase.co", {"store"}),
    "SUPABASE_SERVICE_ROLE_KEY": ("service-role", {"store"}),
    "MAX_CALL_ATTEMPTS": ("7", {"store"}),
    "PATIENT_MAX_CALLS_PER_DAY": ("2", {"store"}),
    "PATIENT_MAX_CALLS_PER_WEEK": ("4", {"store"}),
    "VAPI_MAX_CONCURRENCY": ("12", {"store", "publisher"}),
    "VAPI_CALLS_PER_MINUTE": ("20", {"publisher"}),
    "VAPI_LINE_LEDGER": ("false", {"store", "publisher"}),
    "VAPI_RESERVED_LINES": ("1", {"store"}),
    "VAPI_MAX_CALL_SECONDS": ("700", {"store"}),
    "CLAIM_LEASE_SECONDS": ("90", {"store"}),
    "VAPI_PRIVATE_KEY": ("rotated-key", {"vapi"}),
    "VAPI_ASSISTANT_ID": ("asst-2", {"vapi"}),
    "VAPI_PHONE_NUMBER_ID": ("phone-2", {"vapi"}),
    "VAPI_BASE_URL": ("https://vapi.example.com", {"vapi"}),
    "VAPI_TIMEOUT_SECONDS": ("3", {"vapi"}),
    "CALL_EVENTS_URL": ("https://events.example.com/", {"vapi"}),
    "VAPI_WEBHOOK_SECRET": ("w" * 20, {"vapi"}),
    "VAPI_SERVER_CREDENTIAL_ID": ("cred-1", {"vapi"}),
    "CALL_WINDOW": ("08:00-19:00", {"window"}),
    "CALL_FORM_URL": ("https://edge.example.com/api/jobs/call-form", set()),  # passed as is
    "FAILURE_CALLBACK_URL": ("https://edge.example.com/api/jobs/failed", {"publisher"}),
}


def built(config) -> dict[str, object]:
    return {
        "store": clients.store(config),
        "vapi": clients.vapi(config),
        "publisher": clients.publisher(config),
        "window": clients.window(config),
    }


def test_every_call_form_setting_is_classified():
    assert set(CHANGES) == set(settings.CallFormSettings.model_fields)


@pytest.mark.parametrize("name", CHANGES)
def test_a_changed_setting_rebuilds_exactly_the_clients_built_from_it(name):
    base = settings.CallFormSettings.model_validate(REQUIRED["call_form"])
    before = built(base)
    assert built(settings.CallFormSettings.model_validate(REQUIRED["call_form"])) == before

    value, rebuilt = CHANGES[name]
    changed = settings.CallFormSettings.model_validate({**REQUIRED["call_form"], name: value})
    assert getattr(changed, name) != getattr(base, name)
    after = built(changed)

    assert {n for n in before if after[n] is not before[n]} == rebuilt


def test_each_functions_clients_are_its_own():
    # One process serving every function (the dev server) keeps a client per function.
    call_form = settings.CallFormSettings.model_validate(REQUIRED["call_form"])
    check_forms = settings.CheckFormsSettings.model_validate(REQUIRED["check_forms"])
    first = clients.store(call_form)
    assert clients.store(check_forms) is not first
    assert clients.store(call_form) is first


def test_the_store_gets_the_rules_of_its_function():
    config = settings.CallFormSettings.model_validate(
        {**REQUIRED["call_form"], "PATIENT_MAX_CALLS_PER_DAY": "2", "VAPI_RESERVED_LINES": "3"}
    )
    rules = clients.store(config).rules
    assert (rules.max_per_day, rules.lines, rules.lease_seconds) == (2, 7, 60)
    events = settings.CallEventsSettings.model_validate(
        {**REQUIRED["call_events"], "FOLLOW_UP_ON": "busy", "VAPI_LINE_LEDGER": "false"}
    )
    rules = clients.store(events).rules
    assert (rules.follow_up_on, rules.lines) == (frozenset({"busy"}), None)


def test_setup_publishes_the_schedule_without_call_message_options():
    setup = settings.SetupSettings.model_validate(REQUIRED["setup"])
    publisher = clients.publisher(setup)
    assert (publisher._flow, publisher._failure_callback_url) == (None, None)


# --- README's Configuration table says which functions use each variable ----------------------


def readme_used_by() -> dict[str, set[str]]:
    """variable -> the functions README's table names for it ("same": the row above's)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = text.split("| variable | used by | meaning |", 1)[1].split("\n\n", 1)[0]
    functions = {name.replace("_", "-") for name in FUNCTION_SETTINGS}
    used: dict[str, set[str]] = {}
    previous: set[str] = set()
    for row in table.strip().splitlines()[1:]:
        variables, used_by = row.split("|")[1:3]
        if used_by.strip() == "same":
            names = previous
        elif used_by.strip() == "all but setup":
            names = functions - {"setup"}
        else:
            names = set(re.findall(r"[a-z]+-[a-z]+|setup", used_by)) & functions
        previous = names
        for variable in re.findall(r"`([A-Z_]+)`", re.sub(r"\(or [^)]*\)", "", variables)):
            used[variable] = names
    return used


def test_readme_names_the_functions_whose_models_hold_each_variable():
    used = readme_used_by()
    for name in {n for model in FUNCTION_SETTINGS.values() for n in model.model_fields}:
        holders = {
            f.replace("_", "-") for f, m in FUNCTION_SETTINGS.items() if name in m.model_fields
        }
        assert used.get(name) == holders, name
