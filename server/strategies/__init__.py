"""Server halves of the built-in strategy plugins (registered through entry points)."""
