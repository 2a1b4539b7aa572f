"""The fake Vapi (fake.py, validation.py) and Vapi's published OpenAPI spec it is checked against (spec.py)."""
