"""The one exception type for user mistakes: the CLI prints its message and exits 2."""


class ConvaeError(Exception):
    """Bad input, bad config or a mismatched checkpoint: a user mistake, not a bug."""
