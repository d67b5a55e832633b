"""The one base class of input errors.

A ``UserError`` is bad input the user can fix (a config key, a pairs file, a layer name, a run
folder, a coefficient): its message names what to fix. Every command catches it once, prints
the message alone and exits with status 2. Anything else is a bug and propagates with its
traceback."""


class UserError(ValueError):
    """Bad input; the message says what to fix."""
