"""Errors a user can act on; the CLI prints their message without a traceback."""


class TqinferError(Exception):
    """Base of the errors tqinfer raises at its boundaries."""


class ContextError(TqinferError, ValueError):
    """A prompt or document does not fit the context."""


class CacheMemoryError(TqinferError, MemoryError):
    """A cache that would not fit in memory, refused before allocating."""


class Cancelled(TqinferError):
    """The caller asked a running step to stop (Esc or Ctrl-C while a prompt is read); the cache is
    left as it was before the step."""
