"""The exception families of s3ferry. A class's docstring is its default message."""

from __future__ import annotations


class S3FerryError(Exception):
    """s3ferry failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class UserError(S3FerryError):
    """The request is invalid; nothing was changed."""


class DatabaseError(S3FerryError):
    """The database failed."""


class DatabaseUnavailable(DatabaseError):
    """The database cannot be reached."""


class InvalidTransition(S3FerryError):
    """This status change is not allowed."""


class UploadNotFound(UserError):
    """No such upload."""
