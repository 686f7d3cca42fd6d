"""The one exception type for user mistakes: the CLI prints its message on one line and exits 2."""


class UserError(Exception):
    """Bad input the user can fix (config, data, paths). Never a bug in fedsubspace."""
