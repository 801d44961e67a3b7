"""Atomic writes: a reader (or a Ctrl+C, or a crash) never sees half a file or half a folder.

Every file and folder loradesk writes goes through here: a temporary name in the same folder, fsync, one os.replace.
mkstemp/mkdtemp create owner-only entries and os.replace keeps that mode, so the temporary gets the mode a plain
open()/mkdir() would have given (0o666 / 0o777 less the umask) before the rename: A1111 or ComfyUI running as
another user must be able to read the LoRA. Stdlib only.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def _read_umask() -> int:
    # os.umask can only be read by setting it; done once at import, before any thread writes files
    old = os.umask(0)
    os.umask(old)
    return old


_UMASK = _read_umask()
FILE_MODE = 0o666 & ~_UMASK
DIR_MODE = 0o777 & ~_UMASK


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path` to write; on success it is fsynced and replaces `path` in one rename.
    On failure the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _fsync_file(tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except Exception as err:
        named = as_os_error(err, path, Path(tmp), path)
        if named is None:
            raise
        raise named from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextmanager
def atomic_dir(final: str | Path):
    """Yield a temporary folder beside `final` to fill; on success it becomes `final` (an existing `final` is
    swapped out with two renames, so a crash leaves the old or the new folder, never half of one)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        for path in tmp.rglob("*"):  # on disk before the rename makes the folder visible (a power cut)
            if path.is_file():
                _fsync_file(path)
        os.chmod(tmp, DIR_MODE)
        _swap_in(tmp, final)
        _fsync_dir(final.parent)
    except Exception as err:
        named = as_os_error(err, final, tmp, final)
        if named is None:
            raise
        raise named from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def as_os_error(err: BaseException, path: str | Path, tmp: Path | None = None, final: Path | None = None
                ) -> OSError | None:
    """A failed write as the OSError it is, naming the file the user knows: safetensors reports a full disk as its
    own error type with the OS's words inside ("No space left on device (os error 28)"), and a temporary name
    (inside `tmp`) is shown as the name it was to get (under `final`). None when `err` is no OS error."""
    if isinstance(err, OSError):
        code, words, where = err.errno, err.strerror or str(err), err.filename or path
    else:
        found = re.search(r"([^:]*) \(os error (\d+)\)", str(err))
        if found is None:
            return None
        code, words, where = int(found.group(2)), found.group(1).strip(), path
    where = Path(where)
    if tmp is not None and final is not None and where.is_relative_to(tmp):
        where = final / where.relative_to(tmp)
    if not code:  # no errno: the path goes into the words (a filename alone prints as "[Errno None] None: ...")
        return OSError(f"{words} (writing {where})")
    return OSError(code, words, str(where))  # the subclass of its code: FileExistsError for 17, ...


def clean_leftovers(folder: str | Path) -> None:
    """After a crash, in a folder no writer is using: remove the temporary files and folders of interrupted
    writes, and finish an interrupted swap (an `.X.old` without `X` is the only complete copy: it is put back)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for leftover in folder.glob(".*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
    for old in folder.glob(".*.old"):
        final = old.with_name(old.name[1:-len(".old")])
        if final.exists():
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
        else:
            os.replace(old, final)


def set_aside(path: str | Path, tag: str = "damaged") -> Path:
    """Rename path to <name>.<tag> (or .<tag>-2 ...) in one rename, so nothing that looks for its name finds it;
    returns the new path (a damaged checkpoint is kept for the user, never read again)."""
    path = Path(path)
    aside, n = path.with_name(f"{path.name}.{tag}"), 2
    while aside.exists():
        aside, n = path.with_name(f"{path.name}.{tag}-{n}"), n + 1
    os.replace(path, aside)
    return aside


def _swap_in(tmp: Path, final: Path) -> None:
    if not final.exists():
        os.replace(tmp, final)
        return
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | Path, data, indent: int = 1) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=indent))


def save_image_atomic(image, path: str | Path) -> Path:
    """Save a PIL image as PNG."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    # makes the rename itself durable; folders cannot be opened on Windows, where the rename is durable enough
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
