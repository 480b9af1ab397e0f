"""The one exception type our user-facing checks raise."""


class BWSKError(ValueError):
    """Bad input or an unusable environment, stated in one line that names the fix.

    The CLI prints the message alone (no traceback unless ``--debug``) and exits with code 2.
    """
