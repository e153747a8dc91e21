"""The folders a server writes, and how they are kept small: generated images and attention maps under OUTPUT_ROOT,
uploads and training jobs under FINETUNE_ROOT, each request in a fresh folder of its own.

`prune` holds a folder to the output TTL and size cap (IMAGECRAFT_OUTPUT_TTL, IMAGECRAFT_OUTPUT_MB, read at each
sweep); finished training jobs are kept to the newest KEEP_JOBS instead. Module state: `_last_pruned`, the time of
each folder's last sweep, so that a folder is swept at most every PRUNE_EVERY seconds.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

OUTPUT_ROOT = Path(tempfile.gettempdir()) / "imagecraft-outputs"
FINETUNE_ROOT = Path(tempfile.gettempdir()) / "imagecraft-finetune"
KEEP_JOBS = int(os.environ.get("IMAGECRAFT_KEEP_JOBS", "8"))  # finished jobs' folders kept, oldest dropped first


def output_limits() -> tuple[float, float]:
    """(seconds, bytes): IMAGECRAFT_OUTPUT_TTL (default 3600) and IMAGECRAFT_OUTPUT_MB (default 500)."""
    return float(os.environ.get("IMAGECRAFT_OUTPUT_TTL", "3600")), float(os.environ.get("IMAGECRAFT_OUTPUT_MB",
                                                                                          "500")) * 2**20


PRUNE_EVERY = 10.0  # seconds between two sweeps of one folder: a sweep reads every entry, too slow per request
_last_pruned: dict[Path, float] = {}


def prune(root: Path, keep_younger: float = 0.0) -> None:
    """Drops the entries of `root` older than the output TTL, then the oldest while all of them take more than the
    output cap; entries younger than `keep_younger` seconds stay (another request may still be serving them).
    Sweeps at most every PRUNE_EVERY seconds, so the cap may be passed by that much traffic in between."""
    if time.time() - _last_pruned.get(root, 0.0) < PRUNE_EVERY:
        return
    _last_pruned[root] = time.time()
    ttl, cap = output_limits()
    entries = []
    for entry in root.iterdir() if root.is_dir() else ():
        try:
            files = [f.stat() for f in entry.rglob("*") if f.is_file()] if entry.is_dir() else [entry.stat()]
            entries.append((entry.stat().st_mtime, sum(f.st_size for f in files), entry))
        except OSError:  # removed meanwhile by another request
            continue
    entries.sort(key=lambda e: e[0])
    total, now = sum(size for _, size, _ in entries), time.time()
    for mtime, size, entry in entries:
        if now - mtime < keep_younger:
            break
        if now - mtime > ttl or total > cap:
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            total -= size


def new_output_folder() -> Path:
    """A fresh folder under OUTPUT_ROOT, after `prune` kept the others within the output TTL and size cap."""
    return new_folder(OUTPUT_ROOT, keep_younger=0.0)


def new_folder(root: Path, keep_younger: float | None = None) -> Path:
    """A fresh folder under `root`; with `keep_younger`, after `prune` kept the others within the output TTL and
    size cap, sparing those younger than that many seconds (None: no pruning, as for training jobs, which
    drop_old_jobs keeps instead)."""
    root.mkdir(parents=True, exist_ok=True)
    if keep_younger is not None:
        prune(root, keep_younger=keep_younger)
    folder = root / uuid.uuid4().hex
    folder.mkdir()
    return folder


def new_upload_folder() -> Path:
    """A fresh folder for an upload; `hold_finetune_disk` keeps them, with the jobs' folders, within one cap."""
    return new_folder(FINETUNE_ROOT / "uploads")


def upload_cap() -> float:
    """Bytes that uploads and training jobs may take together: IMAGECRAFT_UPLOAD_MB (default 2048)."""
    return float(os.environ.get("IMAGECRAFT_UPLOAD_MB", "2048")) * 2**20


def hold_finetune_disk(keep=(), incoming: int = 0) -> int:
    """Drops the oldest upload and job folders under FINETUNE_ROOT, whatever their age, until they and `incoming`
    more bytes fit in `upload_cap()`; the folders in `keep` (queued and running jobs', an upload being read) stay.
    Returns the room the incoming bytes have (at least `incoming`). A ValueError, with nothing dropped, when `keep`
    and `incoming` together do not fit: the jobs training take the room, or the upload is larger than the room it
    could have."""
    keep = {Path(k).resolve() for k in keep}
    entries = []
    for root in (FINETUNE_ROOT / "uploads", FINETUNE_ROOT / "jobs"):
        for entry in root.iterdir() if root.is_dir() else ():
            try:
                size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file()) if entry.is_dir() \
                    else entry.stat().st_size
                entries.append((entry.stat().st_mtime, size, entry))
            except OSError:  # removed meanwhile by another request
                continue
    entries.sort(key=lambda e: e[0])
    cap = upload_cap()
    kept = sum(size for _, size, entry in entries if entry.resolve() in keep)
    if kept > cap:
        raise ValueError(f"the server's space for uploads and training ({cap / 2**20:,.0f} MB) is taken by the jobs "
                         f"training now; try again when they finish")
    if kept + incoming > cap:
        raise ValueError(f"the upload unpacks to {incoming / 2**20:,.1f} MB; the server has room for "
                         f"{(cap - kept) / 2**20:,.1f} MB of uploads now (IMAGECRAFT_UPLOAD_MB)")
    total = sum(size for _, size, _ in entries) + incoming
    for _, size, entry in entries:
        if total <= cap:
            break
        if entry.resolve() in keep:
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        total -= size
    return int(cap - total + incoming)


def drop_old_jobs():
    """Keeps the newest KEEP_JOBS finished job folders under FINETUNE_ROOT / "jobs"."""
    root = FINETUNE_ROOT / "jobs"
    if not root.is_dir():
        return
    folders = sorted((p for p in root.iterdir() if (p / "finished").exists()), key=lambda p: p.stat().st_mtime)
    for folder in folders[:-KEEP_JOBS] if KEEP_JOBS else folders:
        shutil.rmtree(folder, ignore_errors=True)
