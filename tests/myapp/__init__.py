"""An example application, for the README's "Testing your application" (tests/test_myapp.py)."""
