"""See docs/architecture.md for what this room will hold."""
