"""formcall_dev: the local stack (local QStash, fake Vapi, function server) and the formcall CLI."""
