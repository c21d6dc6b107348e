"""User mistakes end in one clear line and a non-zero exit; bugs keep their traceback."""


class UserError(Exception):
    """A problem with the user's input (config value, path, data). The CLI prints it as one line."""
