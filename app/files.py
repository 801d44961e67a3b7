"""File handling for uploads: safe names, no overwrites, atomic writes, safe zip extraction."""
from __future__ import annotations

import os
import re
import shutil
import unicodedata
import zipfile
from pathlib import Path

from trainer import UserError, atomic_path, is_ignored

MAX_ZIP_FILES = 10_000
MAX_ZIP_RATIO = 200  # uncompressed/compressed, of a member over 1 MB or of the whole zip; a bomb, not photos


class UploadError(UserError, ValueError):
    """An upload that cannot be used; the message names the file and the fix."""


def safe_filename(name: str, fallback: str = "file") -> str:
    """The last path component, reduced to letters, digits, '-', '_', '.' and spaces; never hidden or empty."""
    base = re.split(r"[\\/]", name)[-1]
    base = unicodedata.normalize("NFKC", base)
    base = re.sub(r"[^\w .-]", "_", base).strip(" .")
    base = re.sub(r"\s+", " ", base)
    if not base or base in (".", ".."):
        base = fallback
    stem, suffix = os.path.splitext(base)
    suffix = suffix[:16].lower()
    return _head_bytes(stem[:120], MAX_NAME_BYTES - len(suffix.encode("utf-8"))) + suffix


MAX_NAME_BYTES = 200  # file systems allow 255 bytes; an atomic write adds '.' and '.XXXXXXXX.tmp' to the name


def _head_bytes(text: str, limit: int) -> str:
    """The longest start of text that is at most `limit` bytes in UTF-8 (never half a character)."""
    return text.encode("utf-8")[:limit].decode("utf-8", "ignore")


def safe_dirname(name: str) -> str:
    """A dataset or folder name of one plain component: path separators and '..' become '_' (so 'my dog/../etc'
    is 'my_dog_etc', not 'etc'), no spaces, no dots at the ends."""
    flat = re.sub(r"(?:\s*[\\/]+\s*|\.\.+)+", "_", name.strip())
    flat = re.sub(r"_+", "_", flat)
    return safe_filename(flat, "dataset").replace(" ", "_").strip("._") or "dataset"


class Budget:
    """The bytes an upload may still write: zip members are counted as they are written (a header can lie), other
    files by their size before they are copied; it refuses before the limit is passed, so a refused upload leaves
    nothing half-written behind."""

    def __init__(self, limit: int, refusal: str):
        self.left, self.refusal = limit, refusal

    def take(self, size: int, name: str) -> None:
        if size > self.left:
            raise UploadError(f"{name}: {self.refusal}")
        self.left -= size


def human_size(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{int(n)} bytes"


def unique_path(folder: Path, name: str, taken: set[str] | None = None) -> Path:
    """folder/name, or folder/name-2, -3 ... when that stem is taken (any suffix counts, so captions stay paired)."""
    stem, suffix = os.path.splitext(name)
    taken = taken if taken is not None else set()
    existing = {p.stem.lower() for p in folder.iterdir()} if folder.is_dir() else set()
    candidate, n = stem, 2
    while candidate.lower() in existing or candidate.lower() in taken:
        candidate = f"{stem}-{n}"
        n += 1
    taken.add(candidate.lower())
    return folder / f"{candidate}{suffix}"


def copy_atomic(src: Path, dst: Path, budget: Budget | None = None) -> Path:
    """Copy through trainer's atomic writer: a crash never leaves half an image, and the mode follows the umask."""
    if budget is not None:
        budget.take(Path(src).stat().st_size, Path(src).name)
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return dst


def extract_zip(zip_path: Path, dest: Path, keep_suffixes: set[str], budget: Budget
                ) -> tuple[list[Path], list[tuple[str, str]]]:
    """Extract the members with a wanted suffix under dest (every path part sanitised); returns (files, skipped).
    Every byte written counts against the budget; a zip whose headers already exceed it is refused unopened.

    Written by hand because zipfile.extractall trusts member names (zip-slip) and sizes (zip bombs)."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        archive = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile:
        raise UploadError(f"{Path(zip_path).name} is not a readable zip file; re-create it and upload again") from None
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        _check_zip_limits(zip_path, members, budget)
        out, skipped = [], []
        for m in members:
            if any(is_ignored(Path(p)) for p in re.split(r"[\\/]", m.filename) if p not in ("", ".", "..")):
                continue  # hidden files and macOS resource forks, as the trainer ignores them
            if Path(m.filename).suffix.lower() not in keep_suffixes:
                skipped.append((m.filename, "not an image or caption file"))
                continue
            target = _member_target(dest, m.filename)
            try:
                with archive.open(m) as src, open(target, "wb") as dst:
                    _copy_limited(src, dst, m.file_size, m.filename, budget)
            except (UploadError, zipfile.BadZipFile, OSError) as e:
                target.unlink(missing_ok=True)
                why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)  # no temporary paths
                skipped.append((m.filename, f"could not be extracted: {why}"))
                continue
            out.append(target)
    return out, skipped


def _member_target(dest: Path, member: str) -> Path:
    """dest/<sanitised parts>: '..', '.', drive letters and leading slashes are dropped, so nothing leaves dest."""
    parts = [p for p in re.split(r"[\\/]", member) if p not in ("", ".", "..") and not p.endswith(":")]
    folders = [safe_dirname(p) for p in parts[:-1]]
    folder = dest.joinpath(*folders)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / safe_filename(parts[-1] if parts else "file")
    n, stem, suffix = 2, target.stem, target.suffix
    while target.exists():
        target = folder / f"{stem}-{n}{suffix}"
        n += 1
    return target


def _check_zip_limits(zip_path: Path, members: list[zipfile.ZipInfo], budget: Budget) -> None:
    """Refuse before extracting: too many members, more bytes than the budget, or a bomb's ratio (of one member,
    or of the whole: on main 150 members of 9.9 MB each passed a per-member check that began at 10 MB)."""
    name = Path(zip_path).name
    if len(members) > MAX_ZIP_FILES:
        raise UploadError(f"{name} holds {len(members)} files; the limit is {MAX_ZIP_FILES}. Split it into smaller zips")
    total, packed = sum(m.file_size for m in members), sum(m.compress_size for m in members)
    if total > 10_000_000 and total > MAX_ZIP_RATIO * max(packed, 1):
        raise UploadError(f"{name} expands {total // max(packed, 1)}x ({human_size(packed)} to {human_size(total)}), "
                          f"which looks like a zip bomb; it was not extracted")
    for m in members:
        if m.file_size > 1_000_000 and m.file_size > MAX_ZIP_RATIO * max(m.compress_size, 1):
            raise UploadError(f"{name}: {m.filename} expands {m.file_size // max(m.compress_size, 1)}x, which looks "
                              f"like a zip bomb; the zip was not extracted")
    if total > budget.left:
        raise UploadError(f"{name} unpacks to {human_size(total)}: {budget.refusal}")


def _copy_limited(src, dst, declared: int, member: str, budget: Budget) -> None:
    """Copy at most the declared size and the budget: a header that lies about it cannot fill the disk."""
    written = 0
    while chunk := src.read(1 << 20):
        written += len(chunk)
        if written > declared:
            raise UploadError(f"{member} is larger than its zip header says; the zip was not extracted")
        budget.take(len(chunk), member)
        dst.write(chunk)
