"""Error types that the CLI turns into one-line messages and exit codes."""


class EdgeDeployError(Exception):
    """Base class: an expected failure with a message fit for the user."""

    exit_code = 2


class InputError(EdgeDeployError):
    """Bad input (missing folder, malformed file, unsupported model): exit code 2."""

    exit_code = 2


class UsageError(InputError):
    """A command-line argument was missing, unknown or out of range (argparse's complaint): exit code 2."""

    exit_code = 2
