"""The local console: a web page over the dev stack's database, local QStash and fake Vapi (127.0.0.1 only)."""

from formcall_dev.console.app import ConsoleConfig, create_app

__all__ = ["ConsoleConfig", "create_app"]
