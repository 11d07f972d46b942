"""User-facing errors: each carries a one-line message and the exit code it ends the program with."""


class UserError(RuntimeError):
    """A problem the user can fix; printed as one line, no traceback."""

    exit_code = 1


class UsageError(UserError, ValueError):
    """Impossible or unusable arguments (argparse's exit code)."""

    exit_code = 2
