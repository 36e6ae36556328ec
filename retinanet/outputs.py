"""Writing output files without losing any: the one atomic writer, the checks an output path
must pass, and the one-line report of a disk that refuses a write.

Every output goes through `atomic_output`: it is written under a temporary name in its own
folder (`.<name>.<random>.tmp`), flushed to disk and renamed onto the target, so a crash, a
full disk or an interrupt leaves the old file or the new one, never a torn one; and a
symlink at the target is replaced, never followed. This module imports nothing of the
package, so that every layer may use it.
"""

from __future__ import annotations

import errno
import os
import tempfile
from contextlib import contextmanager
from fnmatch import fnmatchcase
from glob import escape
from pathlib import Path
from typing import Iterable, Iterator

TEMP_SUFFIX = ".tmp"
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


class OutputRefused(ValueError):
    """An output path that would replace an input, an existing file without `--force`, or a folder."""


class OutputNotWritten(RuntimeError):
    """The disk refused an output (full, read-only, no permission); the message names the file
    and says that what was there before is unchanged."""


class UnwritableFolder(OutputNotWritten):
    """An output folder refused before any work, so nothing at all was written."""


def disk_failure(err: BaseException | None) -> OSError | None:
    """The OSError of a full, read-only or forbidden disk behind `err`, following the chain of
    causes (torch's zip writer, for one, reports a failed write as a RuntimeError raised while
    handling the OSError); None when there is none."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in DISK_ERRNOS:
            return err
        err = err.__cause__ or err.__context__
    return None


def describe_disk_failure(err: OSError, path: str | Path | None = None) -> str:
    """`<file>: not written (<reason>)` for a disk failure (`path`: the file it was writing)."""
    name = path or err.filename or "an output file"
    reason = err.strerror or os.strerror(err.errno)
    if path is None and err.errno in (errno.EACCES, errno.EPERM):  # maybe a read: say only what happened
        return f"{name}: {reason}"
    return f"{name}: not written ({reason})"


@contextmanager
def atomic_output(path: str | Path, sync: bool = True) -> Iterator[Path]:
    """Yield a temporary path in `path`'s folder to write the output to; on success it is
    flushed to disk (`sync`: fsync, which costs milliseconds a file; without it a crash of the
    process still leaves the old file or the new one, a power cut may not) and renamed onto
    `path` (replacing a file or symlink there), on any failure removed. A full, read-only or forbidden disk raises `OutputNotWritten` naming `path`; the
    file that was at `path` before, if any, is untouched either way."""
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        yield tmp
        if sync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        failure = disk_failure(err) or _full_disk(path.parent, err)
        if failure is not None:
            kept = "the file already there is unchanged" if os.path.lexists(path) else "nothing was written"
            raise OutputNotWritten(f"{describe_disk_failure(failure, path)}; {kept}") from None
        raise


def write_text(path: str | Path, text: str, sync: bool = True) -> Path:
    """`text` into `path`, atomically (`atomic_output`)."""
    with atomic_output(path, sync) as tmp:
        tmp.write_text(text)
    return Path(path)


def save_image(image, path: str | Path, sync: bool = True, **params) -> Path:
    """A PIL image into `path`, atomically (`atomic_output`), in the format its extension names."""
    from PIL import Image

    path = Path(path)
    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format is None:
        raise OutputRefused(f"{path}: not an image file name (give it an extension such as .png or .jpg)")
    with atomic_output(path, sync) as tmp:
        image.save(tmp, format=image_format, **params)
    return path


def check_output_file(path: str | Path, inputs: Iterable[str | Path | None] = (), force: bool = False,
                      input_folders: Iterable[str | Path | None] = ()) -> Path:
    """Refuse (`OutputRefused`) an output file that is a folder, one of `inputs` (the same
    file: resolved path or inode, so a hard link or symlink to it too) or inside one of
    `input_folders`, even with `force`; or an existing file without `force`."""
    path = Path(path)
    if path.is_dir():
        raise OutputRefused(f"{path}: is a folder; give the file to write")
    for given in inputs:
        if given is not None and str(given) and same_file(path, Path(given)):
            raise OutputRefused(f"{path}: is the input {given}; an input is never written over, even with "
                                "--force (write elsewhere)")
    for folder in input_folders:
        if folder is not None and str(folder) and Path(folder).is_dir() and \
                Path(folder).resolve() in path.resolve().parents:
            raise OutputRefused(f"{path}: is inside the input folder {folder}; outputs never go into the input "
                                "data, even with --force (write elsewhere)")
    if os.path.lexists(path) and not force:
        raise OutputRefused(f"{path}: already exists; pass --force to replace it")
    return path


def same_file(a: Path, b: Path) -> bool:
    """Whether `a` and `b` name one file: the same resolved path, or the same inode (a hard link)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def check_writable(folder: str | Path) -> Path:
    """Refuse (`UnwritableFolder`), before any work, an output folder this process cannot
    write files in: a probe file is created and removed in it, or in the nearest folder above
    it that exists (nothing is created when that fails)."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return folder  # a file where a folder is needed: the caller's own check says so
    try:
        fd, probe = tempfile.mkstemp(prefix=".retinanet-write-check.", suffix=TEMP_SUFFIX, dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        if err.errno not in DISK_ERRNOS:
            raise
        raise UnwritableFolder(f"{folder}: the output folder cannot be written ({err.strerror}); nothing was "
                               "done") from None
    return folder


def remove_stale_temporaries(folder: str | Path, names: Iterable[str]) -> list[Path]:
    """Remove the temporaries `atomic_output` left for the files `names` in `folder` when a
    process was killed mid-write (`.<name>.*.tmp`; nothing else, nothing in subfolders).
    Returns the removed paths."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    patterns = [f".{escape(name)}.*{TEMP_SUFFIX}" for name in names]
    removed = []
    for entry in folder.iterdir():
        if any(fnmatchcase(entry.name, p) for p in patterns) and entry.is_file() and not entry.is_symlink():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _full_disk(folder: Path, err: BaseException) -> OSError | None:
    """ENOSPC for a write that failed without an errno (a C++ writer's stream error) on a disk
    with no space left; None otherwise."""
    if not isinstance(err, Exception):
        return None
    try:
        stats = os.statvfs(folder)
    except (OSError, AttributeError):  # AttributeError: no statvfs on Windows
        return None
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) if stats.f_bavail == 0 else None


def _file_mode() -> int:
    """The mode `open()` would give a new file (mkstemp's are private to their owner)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask
