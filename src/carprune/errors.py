"""The one exception users see: a sentence that names the problem and the fix."""


class CarpruneError(Exception):
    """Bad input or an impossible request; the CLI prints it and exits with status 2.

    Raised inside a DataLoader worker (a file that cannot be decoded), it reaches the main
    process wrapped in the worker's traceback; the sentence is its last line."""

    def __init__(self, message: str = ""):
        marker = "CarpruneError: "
        if message.startswith("Caught CarpruneError") and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)
