"""Error types of the audiogen library.

Every error a caller can trigger with bad input names the offending field and the limit it broke, so that the
batch pipeline can write it to an error row and the server can turn it into a 4xx body without parsing text.
They subclass the builtin exceptions (`ValueError`, `FileNotFoundError`, `RuntimeError`) so that plain
`except ValueError` code keeps working.
"""

from __future__ import annotations

from typing import Any


class InvalidRequestError(ValueError):
    """A generation argument is outside what the model accepts.

    `field` is the argument name as the user wrote it (`duration`, `top_p`, `prompts[2]` ...), `limit` a short
    human description of the allowed range, `value` what was given.
    """

    def __init__(self, field: str, message: str, *, limit: str | None = None, value: Any = None) -> None:
        self.field = field
        self.limit = limit
        self.value = value
        text = f"{field}: {message}"
        if limit is not None:
            text += f" (allowed: {limit})"
        super().__init__(text)


class InvalidConfigError(ValueError):
    """A model configuration is inconsistent or unsupported (names the field and the rule)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"config.{field}: {message}")


class CheckpointError(ValueError):
    """A checkpoint cannot be understood: unknown layout, mismatched keys or shapes, unsupported features."""


class MissingCheckpointFileError(FileNotFoundError):
    """A file that a checkpoint layout requires is absent; the message names the file and the layout."""


class QueueFullError(RuntimeError):
    """The engine's bounded request queue is full; retry later."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(f"request queue is full (max_queued_requests={limit}); retry later")


class RequestCancelledError(RuntimeError):
    """The request was cancelled before it finished."""


class EngineClosedError(RuntimeError):
    """The engine was shut down; no more requests are accepted."""


class ResourceLimitError(RuntimeError):
    """The requested engine size does not fit the memory budget of its device."""
