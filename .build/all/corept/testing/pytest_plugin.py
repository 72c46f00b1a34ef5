"""pytest plugin shipped by corept (``pytest11`` entry point): fixtures for plugin conformance tests."""
