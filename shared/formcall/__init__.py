"""formcall: deadline-driven patient calls (the Lambda layer package)."""
