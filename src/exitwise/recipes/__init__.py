"""End-to-end recipes composed from the library's components (the CLI calls these)."""
