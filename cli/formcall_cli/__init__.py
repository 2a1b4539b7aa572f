"""formcall_cli: the `formcall` operator command (status, doctor, trigger, schedule, sign-event)."""
