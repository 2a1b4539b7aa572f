"""Every function's ASGI app (the very apps Mangum wraps on Lambda) in one server, at the design paths."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from starlette.applications import Starlette

REPO_ROOT = Path(__file__).resolve().parents[2]
FUNCTIONS = (
    "call_form",
    "check_forms",
    "setup",
    "schedule_form",
    "failure_callback",
    "call_events",
)


def load_function(name: str):
    """Import functions/<name>/app.py as `functions.<name>.app`."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    return importlib.import_module(f"functions.{name}.app")


def create_app(functions: tuple[str, ...] = FUNCTIONS) -> Starlette:
    routes, handlers = [], {}
    for name in functions:
        app = load_function(name).app
        routes += [route for route in app.routes if getattr(route, "path", "/") != "/"]
        handlers.update(app.exception_handlers)
    # The apps' own handlers, so a 404 or 405 is JSON here too, as on Lambda.
    return Starlette(routes=routes, exception_handlers=handlers)
