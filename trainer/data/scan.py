"""Scan a dataset folder: images, captions, per-folder repeats, and the files that had to be skipped.

Cheap to import (PIL and the stdlib; no torch, no diffusers) so a bad dataset is reported before any model loads.
Layout (kohya's): images directly in the root repeat `dataset.repeats` times per epoch; images anywhere under a
subfolder named like `10_name` repeat 10 times; other subfolders use `dataset.repeats`. In the regularization
folder, images outside an `N_` subfolder repeat once.
"""
from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from trainer.paths import expand_path

from .captions import read_caption, resolve_trigger, split_tags, with_trigger
from .errors import DatasetError, ImageLoadError
from .images import IMAGE_EXTENSIONS, is_image_file, probe_image

_REPEATS_FOLDER = re.compile(r"^(\d+)_(.*)$")
_IGNORED_FOLDERS = {"__MACOSX"}
_MAX_LISTED = 10  # file names listed in one warning before "and N more"


@dataclass(frozen=True)
class ImageItem:
    path: Path
    caption: str          # as read from the caption file, without the trigger; "" when there is none
    has_caption: bool
    repeats: int
    width: int            # after EXIF rotation
    height: int
    folder: str           # the subset: the top-level subfolder's name, or the root's name for images in the root
    caption_file: Path | None = None
    regularization: bool = False  # from dataset.regularization_path: never given the trigger, loss weighted


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str


@dataclass
class DatasetScan:
    root: Path
    items: list[ImageItem]
    skipped: list[Skipped] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    trigger: str = ""

    @property
    def num_images(self) -> int:
        """Training images per epoch, repeats included (regularization images not counted)."""
        return _draws(self.items, regularization=False)

    @property
    def num_reg_images(self) -> int:
        """Regularization images, repeats included (kohya's ss_num_reg_images)."""
        return _draws(self.items, regularization=True)

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """kohya's ss_tag_frequency: folder -> tag -> images whose (trigger-prefixed) caption holds the tag."""
        out: dict[str, dict[str, int]] = {}
        for item in self.items:
            if item.regularization:
                continue
            counts = out.setdefault(item.folder, {})
            for tag in split_tags(with_trigger(item.caption, self.trigger)):
                counts[tag] = counts.get(tag, 0) + 1
        return out


@dataclass(frozen=True)
class _Candidate:
    path: Path
    folder: str
    repeats: int


def scan_dataset(ds, workers: int | None = None, require_images: bool = True) -> DatasetScan:
    """Scan `ds.path` (a DatasetSection), and `ds.regularization_path` when set. Raises DatasetError when a folder
    is missing or (unless require_images is False, as for a dataset still being filled) holds no usable image."""
    root = _folder(ds.path, "dataset.path", "dataset folder", "training images")
    trigger = resolve_trigger(ds)
    items, skipped, warnings = _scan_folder(root, ds, trigger, workers, require_images=require_images)
    warnings += _size_warnings(root, items, ds.resolution)
    if ds.regularization_path.strip():
        reg_root = _folder(ds.regularization_path, "dataset.regularization_path", "regularization folder",
                           "regularization images")
        reg_items, reg_skipped, reg_warnings = _scan_folder(reg_root, ds, "", workers, regularization=True)
        items += reg_items
        skipped += reg_skipped
        warnings += [f"regularization folder: {w}" for w in reg_warnings]
        warnings += _balance_warnings(reg_root, items)
    return DatasetScan(root, items, skipped, warnings, trigger)


def _scan_folder(root: Path, ds, trigger: str, workers: int | None, regularization: bool = False,
                 require_images: bool = True):
    """(items, skipped, warnings) of one folder; DatasetError when it holds no usable image."""
    warnings: list[str] = []
    # dataset.repeats weighs training images; regularization images are balanced to them anyway (epoch_repeats)
    found = _find_candidates(root, 1 if regularization else ds.repeats, warnings)
    skipped = [Skipped(c.path, LINK_OUT) for c in found if leaves_folder(c.path, root)]  # never opened
    candidates = [c for c in found if not leaves_folder(c.path, root)]
    probes = _probe_all([c.path for c in candidates], workers)
    items, issues = [], {}
    for candidate, probe in zip(candidates, probes):
        if isinstance(probe, ImageLoadError):
            skipped.append(Skipped(candidate.path, probe.reason))
            continue
        items.append(_make_item(candidate, probe, issues, regularization))
    if not items and require_images:
        kind = "regularization folder" if regularization else "dataset folder"
        raise DatasetError(_no_images_message(root, candidates, skipped, warnings, kind))
    warnings += _caption_warnings(root, items, issues, trigger, regularization)
    return items, skipped, warnings


def _folder(path: str, key: str, kind: str, what: str) -> Path:
    if not str(path).strip():
        raise DatasetError(f"{key} is empty: choose the folder that holds your {what}")
    root = expand_path(path)
    if not root.exists():
        raise DatasetError(f"{kind} {root} does not exist: check {key}")
    if not root.is_dir():
        raise DatasetError(f"{key} {root} is a file, not a folder: give the folder that holds the {what}")
    return root


def _balance_warnings(reg_root: Path, items: list[ImageItem]) -> list[str]:
    """kohya's rule: an epoch trains as many regularization images as training images (see epoch_repeats)."""
    train, reg = _draws(items, regularization=False), _draws(items, regularization=True)
    if reg > train:
        return [f"{reg_root} holds {reg} regularization images (with repeats) but an epoch trains only as many as "
                f"training images ({train}); the first {train} in name order are used"]
    return []


def _find_candidates(root: Path, default_repeats: int, warnings: list[str]) -> list[_Candidate]:
    """Image files in a stable order, each with its subset folder and repeats."""
    if _REPEATS_FOLDER.match(root.name) and any(is_image_file(p) for p in root.iterdir()):
        warnings.append(f"the dataset folder itself is named {root.name}: images directly in it repeat "
                        f"dataset.repeats ({default_repeats}) times, not {int(root.name.split('_')[0])}; to use "
                        f"the folder's number, set dataset.path to its parent folder {root.parent}")
    out = []
    for entry in sorted(root.iterdir()):
        if is_ignored(entry):
            continue
        if entry.is_file() and is_image_file(entry):
            out.append(_Candidate(entry, root.name, default_repeats))
        elif entry.is_dir() and leaves_folder(entry, root):
            warnings.append(f"folder {entry.name} is a link that leaves the dataset folder; it is not read")
        elif entry.is_dir():
            repeats = folder_repeats(entry.name, default_repeats)
            if repeats == 0:
                warnings.append(f"folder {entry.name} asks for 0 repeats, so its images are not used; rename it "
                                f"(for example 1_{_REPEATS_FOLDER.match(entry.name).group(2)}) to train on them")
                continue
            out += [_Candidate(p, entry.name, repeats) for p in _walk_images(entry)]
    return out


LINK_OUT = "a link that leaves the dataset folder; not opened"


def leaves_folder(path: Path, root: Path) -> bool:
    """True for a path that resolves outside root (a symlink, or a link in a folder above it): such a file belongs
    to someone else's folder, so a dataset never reads it (it could be /etc/passwd)."""
    try:
        real = Path(os.path.realpath(os.path.expanduser(path)))
        return not real.is_relative_to(os.path.realpath(os.path.expanduser(root)))
    except (OSError, ValueError):
        return True


def folder_repeats(name: str, default: int) -> int:
    """10 for '10_name' (kohya's convention), else the default."""
    match = _REPEATS_FOLDER.match(name)
    return int(match.group(1)) if match else default


def _walk_images(folder: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not is_ignored(Path(d)))
        out += [Path(dirpath, f) for f in sorted(filenames) if is_image_file(Path(f))]
    return out


def is_ignored(path: Path) -> bool:
    """Hidden files and folders, and macOS's __MACOSX resource forks: never part of a dataset."""
    return path.name.startswith(".") or path.name in _IGNORED_FOLDERS


_probes: dict[tuple[str, int, int], object] = {}  # (path, mtime_ns, size) -> probe result: a rescan decodes only
                                                 # new or changed files (the app rescans after every caption edit)


def _probe_all(paths: list[Path], workers: int | None) -> list:
    """(width, height) or the ImageLoadError, per path, in order. Threads: PIL decodes without the GIL."""
    def probe(path):
        try:
            stat = path.stat()
        except OSError as e:
            return ImageLoadError(path, f"cannot be read ({e.strerror or e})")
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        if key not in _probes:
            try:
                _probes[key] = probe_image(path)
            except ImageLoadError as e:
                _probes[key] = e
        return _probes[key]
    workers = workers or min(8, os.cpu_count() or 1)
    if workers <= 1 or len(paths) < 8:
        return [probe(p) for p in paths]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(probe, paths))


def _draws(items: list[ImageItem], regularization: bool) -> int:
    """Images of one kind (training or regularization), repeats included."""
    return sum(item.repeats for item in items if item.regularization == regularization)


def _make_item(candidate: _Candidate, size: tuple[int, int], issues: dict[str, list[Path]],
               regularization: bool) -> ImageItem:
    caption = read_caption(candidate.path)
    for issue in caption.issues:
        issues.setdefault(issue, []).append(candidate.path)
    return ImageItem(candidate.path, caption.text, bool(caption.text), candidate.repeats, size[0], size[1],
                     candidate.folder, caption.path, regularization)


def _names(root: Path, paths: list[Path]) -> str:
    names = [p.relative_to(root).as_posix() for p in paths]
    more = len(names) - _MAX_LISTED
    return ", ".join(names[:_MAX_LISTED]) + (f" and {more} more" if more > 0 else "")


def _caption_warnings(root: Path, items: list[ImageItem], issues: dict, trigger: str,
                      regularization: bool = False) -> list[str]:
    out = []
    bare = [item.path for item in items if not item.has_caption]
    if bare and regularization:
        out.append(f"{len(bare)} image{'s have' if len(bare) > 1 else ' has'} no caption and train with an empty "
                   f"one; give each the prompt it was drawn from in a same-name .txt: {_names(root, bare)}")
    elif bare and trigger.strip():
        out.append(f"{len(bare)} image{'s have' if len(bare) > 1 else ' has'} no caption and use the trigger word: "
                   f"{_names(root, bare)}")
    elif bare:
        out.append(f"{len(bare)} image{'s have' if len(bare) > 1 else ' has'} no caption and no trigger word is "
                   f"set, so they train with an empty caption: {_names(root, bare)}; add .txt captions or set "
                   f"dataset.trigger")
    if issues.get("both_caption_files"):
        out.append(f"these images have both a .txt and a .caption file; the .txt is used: "
                   f"{_names(root, issues['both_caption_files'])}")
    if issues.get("not_utf8"):
        out.append(f"the captions of these images are not UTF-8 and were read as Windows-1252; save them as UTF-8 "
                   f"if they look wrong: {_names(root, issues['not_utf8'])}")
    return out


def _size_warnings(root: Path, items: list[ImageItem], resolution: int) -> list[str]:
    small = [item.path for item in items if min(item.width, item.height) * 2 < resolution]
    if not small:
        return []
    return [f"{len(small)} image{'s are' if len(small) > 1 else ' is'} less than half the training resolution "
            f"({resolution}) on the short side and will be upscaled (blurry): {_names(root, small)}"]


def _no_images_message(root: Path, candidates: list[_Candidate], skipped: list[Skipped], warnings: list[str],
                       kind: str = "dataset folder") -> str:
    exts = ", ".join(sorted(IMAGE_EXTENSIONS))
    fix = (f"put images ({exts}) with same-name .txt captions in {root} or in subfolders named like 10_name "
           f"(10 = repeats per epoch)")
    if not candidates:
        extra = f" ({'; '.join(warnings)})" if warnings else ""
        return f"no image found in {kind} {root}{extra}: {fix}"
    reasons = "; ".join(f"{s.path.relative_to(root).as_posix()}: {s.reason}" for s in skipped[:_MAX_LISTED])
    more = len(skipped) - _MAX_LISTED
    return (f"no usable image in {kind} {root}: all {len(skipped)} image files were skipped ({reasons}"
            f"{f' and {more} more' if more > 0 else ''}); replace the damaged files, or {fix}")
