"""The one exception type users see for bad input."""


class JaxinferError(ValueError):
    """Bad input: the message names the value, the limit and the fix."""
