"""The exception and warning types users see; the CLI prints each as a single line (errors exit 2)."""
from __future__ import annotations

import string
from typing import Callable


class LoraCompressError(Exception):
    """A problem with the user's input, stated as what is wrong and how to fix it."""


class OptionError(LoraCompressError):
    """A bad setting. Its message names config fields as ``{field}``: in Python they read as the field's
    name (``budget``), on the command line as the command's flag (``--budget``), so each reader sees the
    word they typed.

    Example:
        >>> OptionError("{budget} 1.5 is outside (0, 1]; pass a fraction such as 0.8")
        OptionError('budget 1.5 is outside (0, 1]; pass a fraction such as 0.8')
    """

    def __init__(self, template: str):
        self.template = template
        super().__init__(self.worded(lambda field: field))

    @property
    def fields(self) -> tuple[str, ...]:
        """The fields the message names."""
        return tuple(name for _, name, _, _ in string.Formatter().parse(self.template) if name)

    def worded(self, word: Callable[[str], str]) -> str:
        """The message with each field named by ``word(field)``."""
        return self.template.format_map({field: word(field) for field in self.fields})


class LoraCompressWarning(UserWarning):
    """Something the user asked for has no effect, or a result needs a second look; the run goes on."""


class OptionWarning(LoraCompressWarning):
    """A warning about a setting, naming fields as ``{field}`` as :class:`OptionError` does."""

    def __init__(self, template: str):
        self.template = template
        super().__init__(self.worded(lambda field: field))

    fields = OptionError.fields
    worded = OptionError.worded
