"""The exception and warning types users see; the CLI prints each as a single line (errors exit 2)."""


class LoraCompressError(Exception):
    """A problem with the user's input, stated as what is wrong and how to fix it."""


class LoraCompressWarning(UserWarning):
    """Something the user asked for has no effect, or a result needs a second look; the run goes on."""
