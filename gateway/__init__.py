"""busgate daemon."""
