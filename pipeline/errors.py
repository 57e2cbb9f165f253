"""What kind of failure an exception is: one that repeats when the same work is retried.

:class:`PermanentError` marks configuration mistakes, unreadable inputs and endpoints that
refuse every request. Orchestration (``flows/``) never retries them: retrying would only repeat
the failure, or pay a teacher again for nothing. Everything else (a dropped connection, a full
disk, a killed worker) may succeed on the next try.
"""


class PermanentError(Exception):
    """Raised again by a retry of the same work; stop and say what to fix."""

# Built-in errors that a retry of the same code on the same input raises again.
_DETERMINISTIC = (ValueError, TypeError, LookupError, AttributeError, NotImplementedError,
                  AssertionError, ImportError, FileNotFoundError, IsADirectoryError,
                  NotADirectoryError, PermissionError)


def retryable(error: BaseException) -> bool:
    """Whether retrying the failed work may help: not for a :class:`PermanentError` nor for the
    built-in errors a bug or bad input raises every time; yes for the rest (lost connections,
    killed workers, timeouts)."""
    return not isinstance(error, (PermanentError, *_DETERMINISTIC))
