"""The error contract: every mistake a user can make raises a `TesseraError` whose message names the
input and the rule it broke. The CLI turns one into a single line and a non-zero exit; the HTTP layer
into a 4xx. Each subclass also derives from the built-in error it refines (ValueError, ...), so code
that caught those keeps working."""
from __future__ import annotations

import re


class TesseraError(Exception):
    """Base of every error Tessera raises for bad input or a missing / mismatched model."""

    exit_code = 2


class InvalidInputError(TesseraError, ValueError):
    """An argument, file or request field breaks a rule (the message names which and why)."""


class ModelNotFoundError(TesseraError, FileNotFoundError):
    """A model / pipeline folder or preset that does not exist, or has no weights here."""

    def __str__(self) -> str:  # FileNotFoundError's str() would show the errno tuple
        return str(self.args[0]) if self.args else ""


class WrongModelError(InvalidInputError):
    """A model of another kind than the command needs (a tokenizer where a generator is expected, ...)."""


class DeviceError(TesseraError, RuntimeError):
    """A device or dtype that this machine does not have."""


class UnsafePromptRejected(TesseraError, ValueError):
    """Base of the usage-policy refusal (`tessera.safety.UnsafePromptError`)."""

    exit_code = 3


def plain(message: str) -> str:
    """One line for a user: whitespace collapsed, object addresses ('<_io.BytesIO object at 0x7f..>') removed."""
    return " ".join(re.sub(r" ?<[\w.]+ object at 0x[0-9a-f]+>| at 0x[0-9a-f]+", "", message).split())
