"""The one exception type the command line turns into a one-line message and a non-zero exit."""


class UserError(Exception):
    """Something about the user's input (a file, a flag, a checkpoint) that they can fix."""
