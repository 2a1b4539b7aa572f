"""Test helpers, imported as a package (never from conftest): fakes, Lambda invocation, reads."""
