"""Errors the CLI turns into one-line messages and exit codes."""


class CompressorError(Exception):
    """An error the user can fix. The message is one line that says what to do."""

    exit_code = 1


class BudgetError(CompressorError):
    """The budget cannot be met, or the accuracy drop exceeds the allowed maximum."""

    exit_code = 3


class UsageError(CompressorError):
    """A malformed option value (exit code 2, like other usage errors)."""

    exit_code = 2
