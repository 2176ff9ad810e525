"""Errors that reach the user as one line."""


class ChaperoneError(Exception):
    """Something chaperone itself could not do (exit status 255 in the CLI)."""

    exit_code = 255


class UsageError(ChaperoneError):
    """Bad input from the user (exit status 2)."""

    exit_code = 2


class NoSuchRun(ChaperoneError):
    exit_code = 4


class StartFailed(ChaperoneError):
    """The run never started: its start never reached its host, or was
    refused there (its record says ``failed``, with the original error)."""


class ConnectionLost(ChaperoneError):
    """The transport to the host broke; the run itself goes on."""


class ConnectFailed(ChaperoneError):
    """Could not connect to or log in to the host.  ``transient``: worth
    retrying later (refused, timed out, reset), as opposed to a wrong host
    key or a refused login.  ``retry_safe``: dropped before login (sshd's
    MaxStartups, a reset during key exchange): nothing can have run, so the
    call is simply made again."""

    def __init__(self, message: str, transient: bool = False, retry_safe: bool = False):
        super().__init__(message)
        self.transient = transient or retry_safe
        self.retry_safe = retry_safe


class AgentFailed(ChaperoneError):
    """The agent answered with an error (its one-line message)."""

    def __init__(self, message, code):
        super().__init__(message)
        self.agent_code = code


class TimeoutExpired(Exception):
    """A child process did not exit within the time given (``Child.wait``)."""
