"""The one exception users see: a sentence that names the problem and the fix."""


class CarpruneError(Exception):
    """Bad input or an impossible request; the CLI prints it and exits with status 2."""
