"""Writing output files so that a failure never leaves a partial one, and refusing unwritable paths up front.

Every file ImageCraft writes for a user (PNGs, attention figures, attention maps) goes through `atomic_write`:
a full disk, a killed process or an exception mid-write leaves the old file or none, never a truncated one.
`check_writable` lets the CLI refuse a path before minutes of loading and sampling, not after.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def check_writable(path, label: str = "output") -> Path:
    """`path` as a Path if a file can be written there; a sentence naming `label` and the path otherwise. A missing
    parent folder is fine when it can be created (its nearest existing ancestor is a writable folder)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{label} {str(path)!r} is a folder; give a file name")
    if path.exists() and not path.is_file():  # os.replace would put a regular file in place of a device or pipe
        raise ValueError(f"{label} {str(path)!r} is not a regular file (a device or a pipe); give a file name")
    folder = path.parent
    while not folder.exists() and not folder.is_symlink() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{label} {str(path)!r} cannot be written: {str(folder)!r} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{label} {str(path)!r} cannot be written: the folder {str(folder)!r} is not writable")
    return path


@contextmanager
def atomic_write(path) -> Iterator[BinaryIO]:
    """A binary file that becomes `path` only once completely written: a temporary file in the same folder (so the
    rename stays on one filesystem, where it is atomic), renamed over `path`, removed if anything fails. A missing
    parent folder is created."""
    path = check_writable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
