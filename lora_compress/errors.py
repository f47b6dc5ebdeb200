"""The one exception type users see; the CLI prints it as a single line and exits 2."""


class LoraCompressError(Exception):
    """A problem with the user's input, stated as what is wrong and how to fix it."""
