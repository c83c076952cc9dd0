"""The one exception type the command line turns into a one-line message and a non-zero exit."""


class UserError(Exception):
    """Bad input or configuration: the message names the file, row or key and what is wrong."""
