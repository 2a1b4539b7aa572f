"""The local console: web pages over the dev stack's database, QStash and fake Vapi (127.0.0.1)."""

from formcall_dev.console.app import ConsoleConfig, create_app

__all__ = ["ConsoleConfig", "create_app"]
