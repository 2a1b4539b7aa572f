"""formcall_dev: the local stack (never deployed): its fakes, the function server, the demo, the console, tools."""
