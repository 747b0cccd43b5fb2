"""Typed errors. Each maps to a documented CLI exit code and carries a one-line message."""

from __future__ import annotations

from pathlib import Path


class LoraFormatsError(Exception):
    """Base class: something the user can act on, described in one line."""

    exit_code = 1

    def __init__(self, message: str, *, path: str | Path | None = None) -> None:
        self.path = str(path) if path is not None else None
        self.message = message
        super().__init__(f"{self.path}: {message}" if self.path else message)


class UsageError(LoraFormatsError):
    """The request itself is wrong: bad option, unknown format name, output equals input."""

    exit_code = 2


class InvalidFileError(LoraFormatsError):
    """The input is malformed: truncated, lying header, bad dtype or shape, inconsistent factors."""

    exit_code = 3


class UnsupportedError(LoraFormatsError):
    """The input is valid but cannot be converted as asked: unknown keys, algorithms, ambiguity."""

    exit_code = 4


class OutputError(LoraFormatsError):
    """Reading or writing failed at the operating-system level (permissions, disk full, ...)."""

    exit_code = 5


class VerificationError(LoraFormatsError):
    """`verify` found modules whose changes differ beyond the tolerance."""

    exit_code = 6


EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "internal error (a bug: please report it)",
    UsageError.exit_code: "usage error",
    InvalidFileError.exit_code: "invalid input file",
    UnsupportedError.exit_code: "unsupported or refused conversion",
    OutputError.exit_code: "I/O error",
    VerificationError.exit_code: "verification failed",
}
