"""Exit codes and the exceptions that carry them.

Every module raises an `MtoolError` subclass; only `mtool.cli` turns one into a message and an
exit code. Exceptions keep their constructor arguments in `args`, so they pickle across processes.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """sysexits-style exit codes (DESIGN.md section 6)."""

    OK = 0  # success; an input already imported counts
    BUG = 1  # an unexpected error: traceback only with --debug
    USAGE = 2  # bad command line
    PARTIAL = 3  # finished, but some rows, files or messages were rejected
    DATAERR = 65  # invalid input data; nothing of that input written
    NOINPUT = 66  # input not found
    TEMPFAIL = 75  # a dependency stayed unreachable after retries
    CONFIG = 78  # bad configuration (including a schema that is behind)
    INTERRUPTED = 130  # stopped by a signal; the job can resume


class MtoolError(Exception):
    """An error a user can act on: a message, an optional hint, an exit code."""

    exit_code: ExitCode = ExitCode.BUG
    retryable: bool = False

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message, hint)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\nHint: {self.hint}"


class UsageError(MtoolError):
    exit_code = ExitCode.USAGE


class InvalidInput(MtoolError):
    """The input breaks the contract; nothing of it was written."""

    exit_code = ExitCode.DATAERR


class TooManyRejects(InvalidInput):
    """More rows broke the contract than --max-rejects allows."""


class InputNotFound(MtoolError):
    exit_code = ExitCode.NOINPUT


class DependencyUnavailable(MtoolError):
    """PostgreSQL, Kafka or S3 stayed unreachable after retries."""

    exit_code = ExitCode.TEMPFAIL
    retryable = True


class JobBusy(MtoolError):
    """Another process holds the job; try again later."""

    exit_code = ExitCode.TEMPFAIL
    retryable = True


class ConfigError(MtoolError):
    exit_code = ExitCode.CONFIG


class Interrupted(MtoolError):
    exit_code = ExitCode.INTERRUPTED
