"""Error types shared by every layer.

Both are ValueErrors so that ordinary `except ValueError` code keeps working;
the subclasses let tests and tools tell a bad declaration from a bad call.
"""


class SpecError(ValueError):
    """A declaration is invalid. The message names the map and the symbol."""


class CallError(ValueError):
    """A call's arguments are invalid. The message names the argument and what was expected."""
