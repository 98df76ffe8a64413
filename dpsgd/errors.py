"""The two kinds of failure a user sees, kept apart from crashes (which are bugs).

`ConfigError` is a user's mistake found before any rank trains: its message is one
paragraph naming the key or file and the fix, printed without a traceback.
`NodeFailure` is a peer that died or stopped answering during a run: it names the node.
"""


class ConfigError(Exception):
    """A bad configuration value or missing data file; the message says how to fix it."""


class NodeFailure(RuntimeError):
    """A node died or stopped answering; the run cannot go on without it."""

    def __init__(self, message: str, failed_node: int | None = None):
        super().__init__(message)
        self.failed_node = failed_node
