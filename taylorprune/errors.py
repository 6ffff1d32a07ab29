"""One exception type for everything the user can fix: the CLI turns it into one line and exit code 2."""


class UserError(Exception):
    """Bad input or an unsupported setup; the message says what is wrong and how to fix it."""


class RunError(Exception):
    """A failure during the work itself (non-finite scores, out of memory); reported in one line, exit 1."""
