"""The formcall secret: in AWS every secret setting is in one Secrets Manager secret (JSON object).

`FORMCALL_SECRET_ARN` names it; its keys are the environment variable names (`QSTASH_TOKEN`,
`QSTASH_CURRENT_SIGNING_KEY`, ...). It is read through Powertools Parameters, which keeps it
for `FORMCALL_SECRET_MAX_AGE` seconds (default 300), so a rotated key is picked up without a
redeploy. Without FORMCALL_SECRET_ARN (locally, in tests) there is no secret and nothing is
imported: Powertools Parameters and boto3 cost ~220 ms of cold start.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from types import MappingProxyType

from formcall.errors import ConfigurationError

SECRET_ARN = "FORMCALL_SECRET_ARN"
MAX_AGE = "FORMCALL_SECRET_MAX_AGE"
DEFAULT_MAX_AGE = 300

# What the secret holds; the rest are plain parameters (template.yaml). DATABASE_URL is optional.
SECRET_SETTINGS = (
    "QSTASH_TOKEN",
    "QSTASH_CURRENT_SIGNING_KEY",
    "QSTASH_NEXT_SIGNING_KEY",
    "CRON_SECRET",
    "VAPI_PRIVATE_KEY",
    "SUPABASE_SERVICE_ROLE_KEY",
    "WEBHOOK_SECRET",
    "VAPI_WEBHOOK_SECRET",
    "DATABASE_URL",
)

NO_SECRET: Mapping[str, str] = MappingProxyType({})

# The last value Powertools returned and what it became: the same object while it is cached.
_last: tuple[object, Mapping[str, str]] = (None, NO_SECRET)


def secret_values() -> Mapping[str, str]:
    """The secret's settings (none without FORMCALL_SECRET_ARN); one object until it changes."""
    global _last
    arn = os.environ.get(SECRET_ARN, "").strip()
    if not arn:
        return NO_SECRET
    raw = _fetch(arn, _max_age())
    if raw is _last[0]:
        return _last[1]
    values = parse_secret(raw)
    _last = (raw, values)
    return values


def forget() -> None:
    """Drop the cached secret (tests; a container otherwise keeps it for max age)."""
    global _last
    _last = (None, NO_SECRET)
    parameters = sys.modules.get("aws_lambda_powertools.utilities.parameters")
    if parameters is not None:  # never imported means nothing cached
        parameters.clear_caches()


def _max_age() -> int:
    text = os.environ.get(MAX_AGE, "").strip()
    if not text:
        return DEFAULT_MAX_AGE
    try:
        seconds = int(text)
    except ValueError:
        seconds = -1
    if not 0 <= seconds <= 86_400:
        raise ConfigurationError([MAX_AGE], f"{MAX_AGE} must be whole seconds from 0 to 86400")
    return seconds


def _fetch(arn: str, max_age: int) -> object:
    from aws_lambda_powertools.utilities import parameters

    try:
        return parameters.get_secret(arn, transform="json", max_age=max_age)
    except parameters.exceptions.TransformParameterError:
        # The message would quote the parser's position, never the value; say only what is wrong.
        raise ConfigurationError([SECRET_ARN],
                                 "the secret named by FORMCALL_SECRET_ARN is not JSON") from None
    except Exception as exc:  # not found, access denied, no region, throttled: all unreadable
        error = ConfigurationError([SECRET_ARN],
                                   "the secret named by FORMCALL_SECRET_ARN cannot be read")
        error.detail["cause"] = _error_code(exc)  # logged by web.py, never answered
        raise error from None


def parse_secret(raw: object) -> Mapping[str, str]:
    """The settings in the secret's JSON value; ConfigurationError unless an object of strings."""
    if not isinstance(raw, dict):
        raise ConfigurationError(
            [SECRET_ARN],
            "the secret named by FORMCALL_SECRET_ARN is not a JSON object of settings")
    values: dict[str, str] = {}
    for name, value in raw.items():
        if value is None:  # JSON null: not set, like a missing key
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigurationError([str(name)], f"{name} in the formcall secret must be a string")
        values[str(name)] = str(value)
    return MappingProxyType(values)


def _error_code(exc: BaseException) -> str:
    """The AWS error code behind a failed read (Powertools wraps the ClientError), else the type."""
    for inner in (exc.__cause__, exc.__context__, exc):
        code = getattr(inner, "response", {}).get("Error", {}).get("Code")
        if code:
            return str(code)
    return type(exc).__name__


# Settings a function cannot be given in its environment because CloudFormation would have to
# name the function inside itself (call-form's own URL): SSM parameters named by NAME_PARAMETER.
PARAMETER_SETTINGS = ("CALL_FORM_URL",)


def parameter_values() -> Mapping[str, str]:
    """The PARAMETER_SETTINGS read from SSM (an environment value of their own wins)."""
    names = {name: os.environ[f"{name}_PARAMETER"].strip() for name in PARAMETER_SETTINGS
             if not os.environ.get(name) and os.environ.get(f"{name}_PARAMETER", "").strip()}
    if not names:
        return NO_SECRET
    from aws_lambda_powertools.utilities import parameters

    values = {}
    for name, parameter in names.items():
        try:
            values[name] = str(parameters.get_parameter(parameter, max_age=_max_age()))
        except Exception as exc:  # not found, access denied, throttled: all unreadable
            error = ConfigurationError([f"{name}_PARAMETER"],
                                       f"the SSM parameter named by {name}_PARAMETER cannot be read")
            error.detail["cause"] = _error_code(exc)
            raise error from None
    return MappingProxyType(values)
