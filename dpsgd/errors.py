"""The two kinds of failure a user sees, kept apart from crashes (which are bugs).

`ConfigError` is a user's mistake found before any rank trains: its message is one
paragraph naming the key or file and the fix, printed without a traceback.
`NodeFailure` is a peer that died or stopped answering during a run: it names the node.
"""


class ConfigError(Exception):
    """A bad configuration value or missing data file; the message says how to fix it.

    `rank_specific`: found by one rank about its own files (under torchrun every rank that
    has it says so), rather than about the shared configuration (said once, by rank 0).
    """

    def __init__(self, message: str, rank_specific: bool = False):
        super().__init__(message)
        self.rank_specific = rank_specific


class NodeFailure(RuntimeError):
    """A node died or stopped answering; the run cannot go on without it."""

    def __init__(self, message: str, failed_node: int | None = None):
        super().__init__(message)
        self.failed_node = failed_node


class Interrupted(BaseException):
    """The user stopped the run (Ctrl-C or SIGTERM); a BaseException, like KeyboardInterrupt,
    so that no `except Exception` on the way mistakes it for a failure to report."""

    def __init__(self, signal_number: int):
        import signal

        super().__init__(signal.Signals(signal_number).name)
        self.signal_number = signal_number

    @property
    def exit_code(self) -> int:
        return 128 + self.signal_number  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


def raise_interrupted(signal_number: int, frame=None) -> None:
    """A signal handler: unwind the stack (closing files, killing ranks) as an Interrupted."""
    raise Interrupted(signal_number)


def write_torchrun_error_file(message: str) -> bool:
    """Hand `message` to torchrun as this worker's cause of failure; False when not under torchrun.

    torchrun gives each worker a file to write in TORCHELASTIC_ERROR_FILE (the format of
    torch.distributed.elastic's error handler); its failure report then shows the message
    where it would otherwise say "To enable traceback see ...".
    """
    import json
    import os
    import time

    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return False
    record = {"message": {"message": message, "extraInfo": {"timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as file:
            json.dump(record, file)
    except OSError:
        return False
    return True
