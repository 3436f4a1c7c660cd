"""One exception type for user errors: the CLI prints its message and exits 1."""


class UserError(Exception):
    """A problem with the user's input (path, model, ratios), not a bug."""
