"""Errors that reach the user as one line."""


class ChaperoneError(Exception):
    """Something chaperone itself could not do (exit status 255 in the CLI)."""

    exit_code = 255


class UsageError(ChaperoneError):
    """Bad input from the user (exit status 2)."""

    exit_code = 2


class NoSuchRun(ChaperoneError):
    exit_code = 4


class ConnectionLost(ChaperoneError):
    """The transport to the host broke; the run itself goes on."""


class AgentFailed(ChaperoneError):
    """The agent answered with an error (its one-line message)."""

    def __init__(self, message, code):
        super().__init__(message)
        self.agent_code = code


class TimeoutExpired(Exception):
    """A child process did not exit within the time given (``Child.wait``)."""
