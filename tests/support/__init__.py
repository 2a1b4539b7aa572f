"""Small in-memory collaborators for the use cases' unit tests (imported, never conftest)."""
