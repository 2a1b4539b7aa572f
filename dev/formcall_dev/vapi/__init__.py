"""The fake Vapi (fake.py) and Vapi's published OpenAPI spec it is checked against (spec.py)."""
