"""Dataset folders as the Dataset tab edits them: datasets/<name>/ with images and same-name .txt captions.

Plain functions over the folder (no Gradio), so every edit is saved at once and a restart loses nothing.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from trainer.atomic import write_text_atomic

from .files import UploadError, copy_atomic, extract_zip, safe_dirname, safe_filename, unique_path

CAPTION_SUFFIXES = (".txt", ".caption")  # the trainer reads both; the app writes .txt


def image_suffixes() -> set[str]:
    from trainer.data import IMAGE_EXTENSIONS  # the trainer's list, so the tab and the trainer agree
    return {s.lower() for s in IMAGE_EXTENSIONS}


@dataclass
class Item:
    """One image of a dataset; `name` is its path relative to the dataset folder (posix)."""
    name: str
    path: Path
    caption: str
    has_caption: bool


@dataclass
class UploadReport:
    added: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)

    def text(self) -> str:
        parts = [f"Added {len(self.added)} image(s)"]
        if self.captions:
            parts.append(f"{len(self.captions)} caption(s)")
        if self.skipped:
            parts.append(f"skipped {len(self.skipped)}: " + "; ".join(f"{n} ({r})" for n, r in self.skipped[:5]))
        return ", ".join(parts) + "."


# ----------------------------------------------------------------------------------------------------------------
# datasets

def list_datasets(data_dir: Path) -> list[str]:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        return []
    return sorted(p.name for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def create_dataset(data_dir: Path, name: str) -> Path:
    """datasets/<safe name>/ (an existing one is opened, not replaced)."""
    if not name or not name.strip():
        raise UploadError("give the new dataset a name, for example 'my-dog'")
    folder = Path(data_dir) / safe_dirname(name.strip())
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def dataset_dir(data_dir: Path, name: str | None) -> Path:
    """The folder of a dataset picked by name; the name cannot reach outside data_dir."""
    if not name:
        raise UploadError("pick a dataset first, or create one")
    folder = Path(data_dir) / safe_dirname(name)
    if not folder.is_dir():
        raise UploadError(f"there is no dataset '{name}' in {data_dir}; create it first")
    return folder


def import_folder(data_dir: Path, source: str, name: str = "") -> tuple[Path, UploadReport]:
    """Copy a folder's images and captions (keeping N_name subfolders) into a new dataset folder."""
    src = Path(source.strip()).expanduser() if source else None
    if src is None or not src.is_dir():
        raise UploadError(f"{source!r} is not a folder; give the full path of the folder that holds your images")
    folder = Path(data_dir) / safe_dirname(name or src.name)
    if folder.exists() and any(folder.iterdir()):
        folder = unique_path(Path(data_dir), folder.name)
    folder.mkdir(parents=True, exist_ok=True)
    report, suffixes = UploadReport(), image_suffixes()
    for path in sorted(src.rglob("*")):
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(src).parts):
            continue
        rel = Path(*[safe_filename(p) for p in path.relative_to(src).parts])
        if path.suffix.lower() in suffixes or path.suffix.lower() in CAPTION_SUFFIXES:
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            copy_atomic(path, folder / rel)
            (report.added if path.suffix.lower() in suffixes else report.captions).append(rel.as_posix())
        else:
            report.skipped.append((str(path.relative_to(src)), "not an image or caption file"))
    return folder, report


# ----------------------------------------------------------------------------------------------------------------
# items and captions

def load_items(folder: Path) -> list[Item]:
    folder, suffixes = Path(folder), image_suffixes()
    items = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and path.suffix.lower() in suffixes and not any(p.startswith(".") for p in rel.parts):
            caption_path = _caption_path(path)
            text = caption_path.read_text(encoding="utf-8", errors="replace").strip() if caption_path else ""
            items.append(Item(rel.as_posix(), path, text, caption_path is not None))
    return items


def _caption_path(image: Path) -> Path | None:
    for suffix in CAPTION_SUFFIXES:
        candidate = image.with_suffix(suffix)
        if candidate.is_file():
            return candidate
    return None


def _item_path(folder: Path, name: str) -> Path:
    """An image inside the dataset folder; a name with '..' or an absolute path is refused."""
    path = (Path(folder) / name).resolve()
    if Path(folder).resolve() not in path.parents or not path.is_file():
        raise UploadError(f"{name} is not an image of this dataset; refresh the gallery")
    return path


def save_caption(folder: Path, name: str, caption: str) -> Path:
    """Write the caption of one image (atomically, to its .txt; an existing .caption file is updated instead)."""
    image = _item_path(folder, name)
    target = _caption_path(image) or image.with_suffix(".txt")
    return write_text_atomic(target, caption.strip() + "\n")


def remove_image(folder: Path, name: str) -> None:
    """Delete an image and its caption from the dataset."""
    image = _item_path(folder, name)
    caption = _caption_path(image)
    image.unlink()
    if caption:
        caption.unlink()


def apply_trigger(folder: Path, trigger: str) -> int:
    """Put the trigger word at the front of every caption that does not start with it; returns how many changed."""
    trigger = trigger.strip()
    if not trigger:
        raise UploadError("type a trigger word first, for example 'sks dog'")
    changed = 0
    for item in load_items(folder):
        if item.caption == trigger or item.caption.startswith(trigger + ",") or item.caption.startswith(trigger + " "):
            continue
        save_caption(folder, item.name, f"{trigger}, {item.caption}" if item.caption else trigger)
        changed += 1
    return changed


def find_replace(folder: Path, find: str, replace: str) -> int:
    """Replace text in every caption; returns the number of captions changed."""
    if not find:
        raise UploadError("type the text to find first")
    changed = 0
    for item in load_items(folder):
        if find in item.caption:
            save_caption(folder, item.name, item.caption.replace(find, replace))
            changed += 1
    return changed


# ----------------------------------------------------------------------------------------------------------------
# uploads

def add_uploads(folder: Path, files: list) -> UploadReport:
    """Copy uploaded images, .txt captions and .zip archives into the dataset with safe, unique names.

    A caption is paired with the image of the same original name in the upload (renamed with it); a caption for an
    image already in the dataset is written only if that image has none."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    report = UploadReport()
    with tempfile.TemporaryDirectory(prefix="loradesk-upload-") as tmp:
        paths = _expand_zips([upload_path(f) for f in files or []], Path(tmp), report)
        suffixes = image_suffixes()
        images = [p for p in paths if p.suffix.lower() in suffixes]
        captions = {(p.parent, p.stem): p for p in paths if p.suffix.lower() in CAPTION_SUFFIXES}
        for p in paths:
            if p not in images and p.suffix.lower() not in CAPTION_SUFFIXES:
                report.skipped.append((p.name, f"not an image ({', '.join(sorted(suffixes))}), caption or .zip"))
        renamed = {}
        for src in images:
            dst = unique_path(folder, safe_filename(src.name, "image"))
            copy_atomic(src, dst)
            renamed[(src.parent, src.stem)] = dst
            report.added.append(dst.name)
        for key, src in captions.items():
            _add_caption(folder, key, src, renamed, report)
    return report


def upload_path(f) -> Path:
    """A path from what Gradio hands over: a str/Path, or a file object with .name (older Gradio)."""
    return Path(f) if isinstance(f, (str, Path)) else Path(f.name)


def _expand_zips(paths: list[Path], tmp: Path, report: UploadReport) -> list[Path]:
    keep = image_suffixes() | set(CAPTION_SUFFIXES)
    out = []
    for i, path in enumerate(paths):
        if path.suffix.lower() != ".zip":
            out.append(path)
            continue
        try:
            files, skipped = extract_zip(path, tmp / f"zip{i}", keep)
        except UploadError as e:
            report.skipped.append((path.name, str(e)))
            continue
        out += files
        report.skipped += [(f"{path.name}:{n}", r) for n, r in skipped]
    return out


def _add_caption(folder: Path, key: tuple, src: Path, renamed: dict, report: UploadReport) -> None:
    """Pair a caption with the image of the same folder and stem in this upload, else with a dataset image."""
    text = src.read_text(encoding="utf-8", errors="replace").strip()
    if key in renamed:
        write_text_atomic(renamed[key].with_suffix(".txt"), text + "\n")
        report.captions.append(renamed[key].with_suffix(".txt").name)
        return
    stem = safe_filename(src.name).rsplit(".", 1)[0]
    existing = [p for p in folder.iterdir() if p.stem == stem and p.suffix.lower() in image_suffixes()]
    if not existing:
        report.skipped.append((src.name, "no image with the same name; upload the image with its caption"))
    elif _caption_path(existing[0]):
        report.skipped.append((src.name, f"{existing[0].name} already has a caption; edit it in the gallery"))
    else:
        write_text_atomic(existing[0].with_suffix(".txt"), text + "\n")
        report.captions.append(existing[0].with_suffix(".txt").name)


# ----------------------------------------------------------------------------------------------------------------
# summary: counts, sizes, buckets and skipped files, as the trainer will see them

@dataclass
class Summary:
    text: str
    buckets: list[list]  # [["512x512", 12], ...]
    skipped: list[list]  # [[file, reason], ...]


def summarize(folder: Path, resolution: int = 512, bucket_step: int = 64, seed: int = 42) -> Summary:
    from trainer import data
    from trainer.config import DatasetSection

    ds = DatasetSection(path=str(folder), resolution=resolution, bucket_step=bucket_step)
    try:
        scan = data.scan_dataset(ds)
    except data.DatasetError as e:
        return Summary(f"**Not usable yet:** {e}", [], [])
    skipped = [[str(_rel(s.path, folder)), s.reason] for s in scan.skipped]
    if not scan.items:
        return Summary("No usable images yet: drop some on the left.", [], skipped)
    plan = data.BatchPlan(scan, ds, seed)
    stats = data.bucket_stats(scan, plan)
    buckets = [[f"{w}x{h}", n] for (w, h), n in sorted(stats.items(), key=lambda kv: -kv[1])]
    return Summary(_summary_text(scan), buckets, skipped)


def _summary_text(scan) -> str:
    items = scan.items
    uncaptioned = sum(not i.has_caption for i in items)
    sizes = sorted({(i.width, i.height) for i in items}, key=lambda s: s[0] * s[1])
    per_epoch = sum(i.repeats for i in items)
    lines = [f"**{len(items)} images**, {per_epoch} per epoch with repeats; "
             f"{len(items) - uncaptioned} captioned, {uncaptioned} without caption.",
             f"Sizes from {sizes[0][0]}x{sizes[0][1]} to {sizes[-1][0]}x{sizes[-1][1]}."]
    lines += [f"Note: {w}" for w in scan.warnings]
    return "  \n".join(lines)


def _rel(path, folder: Path) -> Path:
    try:
        return Path(path).relative_to(folder)
    except ValueError:
        return Path(path)

