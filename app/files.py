"""File handling for uploads: safe names, no overwrites, atomic writes, safe zip extraction."""
from __future__ import annotations

import os
import re
import shutil
import unicodedata
import zipfile
from pathlib import Path

from trainer import UserError, atomic_path, is_ignored

MAX_ZIP_BYTES = 2 * 1024**3  # uncompressed total; a zip bomb stops here
MAX_ZIP_FILES = 10_000
MAX_ZIP_RATIO = 200  # uncompressed/compressed per member; larger is a bomb, not a photo


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
    return stem[:120] + suffix[:16].lower()


def safe_dirname(name: str) -> str:
    """A dataset or folder name of one plain component: path separators and '..' become '_' (so 'my dog/../etc'
    is 'my_dog_etc', not 'etc'), no spaces, no dots at the ends."""
    flat = re.sub(r"(?:\s*[\\/]+\s*|\.\.+)+", "_", name.strip())
    flat = re.sub(r"_+", "_", flat)
    return safe_filename(flat, "dataset").replace(" ", "_").strip("._") or "dataset"


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


def copy_atomic(src: Path, dst: Path) -> Path:
    """Copy through trainer's atomic writer: a crash never leaves half an image, and the mode follows the umask."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return dst


def extract_zip(zip_path: Path, dest: Path, keep_suffixes: set[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Extract the members with a wanted suffix under dest (every path part sanitised); returns (files, skipped).

    Written by hand because zipfile.extractall trusts member names (zip-slip) and sizes (zip bombs)."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        archive = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile:
        raise UploadError(f"{Path(zip_path).name} is not a readable zip file; re-create it and upload again") from None
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        _check_zip_limits(zip_path, members)
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
                    _copy_limited(src, dst, m.file_size, m.filename)
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


def _check_zip_limits(zip_path: Path, members: list[zipfile.ZipInfo]) -> None:
    name = Path(zip_path).name
    if len(members) > MAX_ZIP_FILES:
        raise UploadError(f"{name} holds {len(members)} files; the limit is {MAX_ZIP_FILES}. Split it into smaller zips")
    total = sum(m.file_size for m in members)
    if total > MAX_ZIP_BYTES:
        raise UploadError(f"{name} unpacks to {total / 1e9:.1f} GB; the limit is {MAX_ZIP_BYTES / 1e9:.0f} GB. "
                          f"Split it or give the folder path instead")
    for m in members:
        if m.compress_size and m.file_size / m.compress_size > MAX_ZIP_RATIO and m.file_size > 10_000_000:
            raise UploadError(f"{name}: {m.filename} expands {m.file_size // m.compress_size}x, which looks like a "
                              f"zip bomb; it was not extracted")


def _copy_limited(src, dst, declared: int, member: str) -> None:
    """Copy at most the declared size: a header that lies about it cannot fill the disk."""
    written = 0
    while chunk := src.read(1 << 20):
        written += len(chunk)
        if written > declared:
            raise UploadError(f"{member} is larger than its zip header says; the zip was not extracted")
        dst.write(chunk)
