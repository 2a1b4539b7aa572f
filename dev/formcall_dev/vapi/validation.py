"""What Vapi's `POST /call` accepts: its CreateCallDTO's checks, with the messages NestJS answers."""

from __future__ import annotations

import re
from typing import Any

BACKOFF_TYPES = ("fixed", "exponential")
# The top-level properties of Vapi's CreateCallDTO; NestJS rejects any other one.
CREATE_CALL_FIELDS = frozenset(
    {
        "assistantId",
        "assistant",
        "assistantOverrides",
        "squadId",
        "squad",
        "workflowId",
        "workflow",
        "phoneNumberId",
        "phoneNumber",
        "customer",
        "customerId",
        "customers",
        "name",
        "schedulePlan",
        "assistantVersion",
        "transport",
    }
)
CUSTOMER_FIELDS = frozenset(
    {
        "number",
        "name",
        "email",
        "externalId",
        "extension",
        "sipUri",
        "assistantOverrides",
        "squadOverrides",
        "numberE164CheckEnabled",
    }
)
_STRING_FIELDS = (
    "assistantId",
    "squadId",
    "workflowId",
    "phoneNumberId",
    "customerId",
    "name",
    "assistantVersion",
)
_OBJECT_FIELDS = (
    "assistant",
    "assistantOverrides",
    "squad",
    "workflow",
    "phoneNumber",
    "customer",
    "schedulePlan",
    "transport",
)
_E164 = re.compile(r"^\+[1-9]\d{1,14}$")
_ALPHANUMERIC_NUMBER = re.compile(r"^\+?[a-zA-Z0-9]+$")


def validate_create_call(body: Any) -> list[str]:
    """The messages Vapi's validation would answer a create-call body with; empty when valid."""
    if not isinstance(body, dict):
        return ["body must be an object"]
    errors = [
        f"property {name} should not exist" for name in body if name not in CREATE_CALL_FIELDS
    ]
    errors += [
        f"{name} must be a string"
        for name in _STRING_FIELDS
        if name in body and not isinstance(body[name], str)
    ]
    errors += [
        f"{name} must be an object"
        for name in _OBJECT_FIELDS
        if name in body and not isinstance(body[name], dict)
    ]
    if not any(
        body.get(name)
        for name in ("assistantId", "assistant", "squadId", "squad", "workflowId", "workflow")
    ):
        errors.append(
            "assistantId or assistant (or squadId, squad, workflowId, workflow) must be provided"
        )
    if not (body.get("phoneNumberId") or body.get("phoneNumber")):
        errors.append("phoneNumberId or phoneNumber must be provided")
    if "customers" in body:
        errors.append("fake-vapi does not model batch calls: use customer, not customers")
    elif not (body.get("customer") or body.get("customerId")):
        errors.append("customer or customerId must be provided")
    if isinstance(body.get("name"), str) and len(body["name"]) > 40:
        errors.append("name must be shorter than or equal to 40 characters")
    if isinstance(body.get("customer"), dict):
        errors += _validate_customer(body["customer"])
    if isinstance(body.get("assistantOverrides"), dict):
        errors += _validate_overrides(body["assistantOverrides"])
    return errors


def _validate_customer(customer: dict[str, Any]) -> list[str]:
    # class-validator prefixes nested messages with the parent path, even "property X ...".
    errors = [
        f"customer.property {name} should not exist"
        for name in customer
        if name not in CUSTOMER_FIELDS
    ]
    for name, limit in (("name", 40), ("email", 40), ("externalId", 40), ("extension", 10)):
        value = customer.get(name)
        if name in customer and not isinstance(value, str):
            errors.append(f"customer.{name} must be a string")
        elif isinstance(value, str) and len(value) > limit:
            errors.append(f"customer.{name} must be shorter than or equal to {limit} characters")
    if "number" in customer:
        number = customer["number"]
        if not isinstance(number, str):
            errors.append("customer.number must be a string")
        elif customer.get("numberE164CheckEnabled", True) is not False:
            if not _E164.match(number):
                errors.append(
                    "customer.number must be a valid phone number in the E.164 format. "
                    "Hot tip, you may be missing the country code (Eg. US: +1)."
                )
        elif not (3 <= len(number) <= 40 and _ALPHANUMERIC_NUMBER.match(number)):
            errors.append(
                "customer.number must be 3 to 40 alphanumeric characters, "
                "optionally starting with +"
            )
    return errors


def _validate_overrides(overrides: dict[str, Any]) -> list[str]:
    """The checks Vapi's DTO makes on the server-URL settings the fake acts on."""
    prefix = "assistantOverrides."
    errors: list[str] = []
    messages = overrides.get("serverMessages")
    if "serverMessages" in overrides and not (
        isinstance(messages, list) and all(isinstance(m, str) for m in messages)
    ):
        errors.append(f"{prefix}serverMessages must be an array of strings")
    if "server" not in overrides:
        return errors
    server = overrides["server"]
    if not isinstance(server, dict):
        return [*errors, f"{prefix}server must be an object"]
    prefix += "server."
    if not isinstance(server.get("url"), str):
        errors.append(f"{prefix}url must be a string")
    if "credentialId" in server and not isinstance(server["credentialId"], str):
        errors.append(f"{prefix}credentialId must be a string")
    if "headers" in server and not isinstance(server["headers"], dict):
        errors.append(f"{prefix}headers must be an object")
    errors += _number_errors(server, "timeoutSeconds", 1, 300, prefix)
    if "backoffPlan" in server:
        plan = server["backoffPlan"]
        if not isinstance(plan, dict):
            errors.append(f"{prefix}backoffPlan must be an object")
        else:
            if plan.get("type") not in BACKOFF_TYPES:
                errors.append(
                    f"{prefix}backoffPlan.type must be one of the following values: "
                    f"{', '.join(BACKOFF_TYPES)}"
                )
            for name in ("maxRetries", "baseDelaySeconds"):
                if name not in plan:
                    errors.append(f"{prefix}backoffPlan.{name} should not be empty")
                errors += _number_errors(plan, name, 0, 10, f"{prefix}backoffPlan.")
    return errors


def _number_errors(
    data: dict[str, Any], name: str, low: float, high: float, prefix: str
) -> list[str]:
    if name not in data:
        return []
    value = data[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        return [f"{prefix}{name} must be a number conforming to the specified constraints"]
    if value < low:
        return [f"{prefix}{name} must not be less than {low}"]
    if value > high:
        return [f"{prefix}{name} must not be greater than {high}"]
    return []
