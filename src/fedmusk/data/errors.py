"""Errors for problems in a site's data, worded for the person who has to fix the data.

Every module of ``fedmusk.data`` raises these for data problems; command-line code catches :class:`SiteDataError`
and prints ``str(err)`` without a traceback, so the message must say on its own which file (and manifest row and
field, where known) is wrong and what is wrong with it.
"""

from __future__ import annotations

from os import PathLike


class SiteDataError(Exception):
    """A problem with a site's data files or manifest.

    ``path`` is the file concerned (relative to the site root where the caller knows it), ``row`` the 1-based manifest
    data row, ``field`` the manifest column; any of them may be None. ``str()`` puts them in front of the message.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | PathLike[str] | None = None,
        row: int | None = None,
        field: str | None = None,
    ) -> None:
        self.message = message
        self.path = None if path is None else str(path)
        self.row = row
        self.field = field
        super().__init__(str(self))

    def __str__(self) -> str:
        where = []
        if self.row is not None:
            where.append(f"manifest row {self.row}")
        if self.field is not None:
            where.append(f"field '{self.field}'")
        if self.path is not None:
            where.append(self.path)
        return f"{', '.join(where)}: {self.message}" if where else self.message

    def __reduce__(self):  # keep pickling (multiprocessing, Ray) working with keyword-only fields
        return (_rebuild, (type(self), self.message, self.path, self.row, self.field))


def _rebuild(cls, message, path, row, field):
    return cls(message, path=path, row=row, field=field)


class SlideError(SiteDataError):
    """A slide (DICOM WSI, SVS/TIFF, or a folder of tiles) that is missing, unreadable, damaged or not a slide."""
