"""The local QStash: a stand-in for the part of Upstash QStash formcall uses (server.py lists it)."""
