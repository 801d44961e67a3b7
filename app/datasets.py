"""Dataset folders as the Dataset tab edits them: datasets/<name>/ with images and same-name .txt captions.

Plain functions over the folder (no Gradio), so every edit is saved at once and a restart loses nothing. What the
tab lists, how captions are read and written, and the trigger rule are the engine's (`trainer.scan_dataset`,
`read_caption`, `write_caption`, `with_trigger`): the tab shows exactly what the trainer will train on.
"""
from __future__ import annotations

import os
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from trainer import (CAPTION_EXTENSIONS, DATASET_FILE, IMAGE_EXTENSIONS, BatchPlan, CaptionOptions, DatasetError,
                     ImageLoadError, TrainConfig, bucket_stats, dataset_trigger, decode_caption, is_ignored,
                     leaves_folder, probe_image, read_caption, scan_dataset, set_dataset_trigger, with_trigger,
                     write_caption, write_text_atomic)

from .files import (Budget, UploadError, copy_atomic, extract_zip, human_size, safe_dirname, safe_filename,
                    unique_path)

MAX_UPLOAD_BYTES = 2 * 1024**3     # what one upload, zip or folder import may add
MAX_DATASET_BYTES = 20 * 1024**3   # what one dataset folder may hold (thousands of photos)
MAX_CAPTION_BYTES = 64 * 1024      # kohya's longest captions are a few hundred tokens; more is not a caption


@dataclass
class Item:
    """One image the trainer considers; `name` is its path relative to the dataset folder (posix)."""
    name: str
    path: Path
    caption: str          # the caption file's text as the trainer reads it ("" when there is none)
    trained_as: str       # what the trainer trains: the trigger in front when the caption lacks it
    skipped: str = ""     # why the trainer skips this image ("" when it trains on it)


@dataclass
class UploadReport:
    added: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    trigger: str = ""  # the trigger an imported folder's own settings file gave the new dataset

    def text(self) -> str:
        parts = [f"Added {len(self.added)} image(s)"]
        if self.captions:
            parts.append(f"{len(self.captions)} caption(s)")
        if self.trigger:
            parts.append(f"trigger **{self.trigger}** (from its {DATASET_FILE})")
        if self.skipped:
            parts.append(f"skipped {len(self.skipped)}: " + "; ".join(f"{n} ({r})" for n, r in self.skipped[:5]))
        return ", ".join(parts) + "."


def _dataset_section(folder: Path, **values):
    ds = TrainConfig().dataset
    ds.path = str(folder)
    for key, value in values.items():
        setattr(ds, key, value)
    return ds


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


def import_folder(data_dir: Path, source: str, name: str = "", allowed: tuple[Path, ...] = ()
                  ) -> tuple[Path, UploadReport]:
    """Copy a folder's images and captions (keeping N_name subfolders) into a new dataset folder. The folder must
    lie in one of the `allowed` folders (the person running the app chose them); a link out of it is not followed,
    and only files that are valid images or captions are copied."""
    src = _allowed_folder(source, (Path(data_dir), *allowed))
    folder = Path(data_dir) / safe_dirname(name or src.name)
    if folder.exists() and any(folder.iterdir()):
        folder = unique_path(Path(data_dir), folder.name)
    folder.mkdir(parents=True, exist_ok=True)
    report, budget = UploadReport(), dataset_budget(folder)
    for path, why in _walk_source(src):
        rel = Path(*[safe_filename(p) for p in path.relative_to(src).parts])
        if not why and path == src / DATASET_FILE:  # the dataset's own settings: read, checked and written anew
            why = _import_settings(src, folder, report)
        else:
            why = why or _import_one(path, folder, rel, budget, report)
        if why:
            report.skipped.append((path.relative_to(src).as_posix(), why))
    return folder, report


def _allowed_folder(source: str, roots: tuple[Path, ...]) -> Path:
    src = Path(source.strip()).expanduser() if source and source.strip() else None
    if src is None or not src.is_dir():
        raise UploadError(f"{source!r} is not a folder; give the full path of the folder that holds your images")
    if all(leaves_folder(src, root) for root in roots):
        raise UploadError(f"{source} is not in a folder this app may import from; whoever runs it can allow one "
                          f"with --allow-import DIR (or LORADESK_IMPORT_DIRS)")
    return Path(os.path.realpath(src))


def _walk_source(src: Path):
    """(file, "") for each candidate under src, and (path, reason) for links that are not followed."""
    for dirpath, dirnames, filenames in os.walk(src):  # followlinks=False: a linked folder is listed, not entered
        here = Path(dirpath)
        for d in sorted(dirnames):
            if (here / d).is_symlink() and not is_ignored(Path(d)):
                yield here / d, "a linked folder; not followed"
        dirnames[:] = sorted(d for d in dirnames if not is_ignored(Path(d)) and not (here / d).is_symlink())
        for f in sorted(filenames):
            path = here / f
            if is_ignored(path):
                continue
            if leaves_folder(path, src):
                yield path, "a link that leaves the folder; not copied"
            else:  # a FIFO or device named x.png would block or stream forever
                yield path, "" if stat.S_ISREG(os.stat(path).st_mode) else "not a regular file"


def _import_settings(src: Path, folder: Path, report: UploadReport) -> str:
    """Give the new dataset the trigger of the imported folder's loradesk-dataset.toml; returns why not ("" when
    kept). The file is read as any file from outside may be damaged, and never copied as it is."""
    try:
        trigger = dataset_trigger(src, strict=True)
    except DatasetError as e:
        return "damaged" + str(e).split("damaged", 1)[-1]
    if trigger:
        report.trigger = set_trigger(folder, trigger)
    return ""


def _import_one(path: Path, folder: Path, rel: Path, budget: Budget, report: UploadReport) -> str:
    """Copy one file to folder/rel if it is a valid image or caption; returns why not ("" when copied)."""
    suffix, dst = path.suffix.lower(), folder / rel
    try:
        if suffix in IMAGE_EXTENSIONS:
            probe_image(path)
            dst.parent.mkdir(parents=True, exist_ok=True)
            copy_atomic(path, dst, budget)
            report.added.append(rel.as_posix())
        elif suffix in CAPTION_EXTENSIONS:
            _copy_caption(path, dst, budget)
            report.captions.append(rel.as_posix())
        else:
            return "not an image or caption file"
    except ImageLoadError as e:
        return e.reason
    except UploadError as e:
        return str(e).split(": ", 1)[-1]
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    return ""


def caption_text(path: Path) -> str:
    """A caption file's text as the trainer reads it; UploadError when it is too long or not text at all."""
    if path.stat().st_size > MAX_CAPTION_BYTES:
        raise UploadError(f"{path.name}: over {MAX_CAPTION_BYTES // 1024} KB, which is not a caption")
    text = decode_caption(path.read_bytes())[0]
    if "\0" in text:  # after decoding: UTF-16's NUL bytes are half its characters, a binary file's are not
        raise UploadError(f"{path.name}: not a text file")
    return text


def _copy_caption(path: Path, dst: Path, budget: Budget) -> None:
    """A caption written UTF-8, as the trainer reads it."""
    text = caption_text(path)
    budget.take(len(text.encode("utf-8")) + 1, path.name)
    dst.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(dst, text + "\n")


def dataset_budget(folder: Path) -> Budget:
    """What one upload into this dataset may still write: the per-upload cap, or the room the dataset has left."""
    held = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files
               if not os.path.islink(os.path.join(d, f)))
    room = MAX_DATASET_BYTES - held
    if room < MAX_UPLOAD_BYTES:
        return Budget(max(room, 0), f"dataset {Path(folder).name} is full: it holds {human_size(held)} and the limit "
                                    f"is {human_size(MAX_DATASET_BYTES)}; start another dataset")
    return Budget(MAX_UPLOAD_BYTES, f"the limit of one upload is {human_size(MAX_UPLOAD_BYTES)}; split it")


# ----------------------------------------------------------------------------------------------------------------
# items and captions

def load_items(folder: Path) -> list[Item]:
    """Every image the trainer considers, in its order: the ones it trains on and the ones it skips (listed, so
    they can be removed), with captions read by the trainer's own reader."""
    folder = Path(folder)
    scan = scan_dataset(_dataset_section(folder), require_images=False)
    items = [Item(_rel(i.path, folder), i.path, i.caption, with_trigger(i.caption, scan.trigger))
             for i in scan.items]
    items += [Item(_rel(s.path, folder), s.path, read_caption(s.path).text, "", s.reason) for s in scan.skipped]
    return sorted(items, key=lambda item: item.name)


def _rel(path: Path, folder: Path) -> str:
    return Path(path).relative_to(folder).as_posix()


def _item_path(folder: Path, name: str) -> Path:
    """An image inside the dataset folder; a name with '..' or an absolute path is refused."""
    path = (Path(folder) / name).resolve()
    if Path(folder).resolve() not in path.parents or not path.is_file():
        raise UploadError(f"{name} is not an image of this dataset; refresh the gallery")
    return path


def save_caption(folder: Path, name: str, caption: str) -> Path:
    """Write one image's caption where the trainer reads it (its existing caption file, else a new .txt)."""
    _check_caption_size(name, caption)
    return write_caption(_item_path(folder, name), caption)


def _check_caption_size(name: str, caption: str) -> None:
    if len(caption.encode("utf-8")) > MAX_CAPTION_BYTES:
        raise UploadError(f"the caption of {name} would be over {MAX_CAPTION_BYTES // 1024} KB, which is not a "
                          f"caption; shorten it")


def remove_image(folder: Path, name: str) -> None:
    """Delete an image and its caption from the dataset."""
    image = _item_path(folder, name)
    caption = read_caption(image).path
    image.unlink()
    if caption:
        caption.unlink()


def set_trigger(folder: Path, trigger: str) -> str:
    """Save the dataset's trigger (the one place it lives: the trainer puts it in front of each caption that
    lacks it); returns it."""
    set_dataset_trigger(folder, trigger)
    return dataset_trigger(folder)


def apply_trigger(folder: Path, trigger: str) -> int:
    """Write the trigger into every caption that lacks it, by the trainer's rule (a caption that holds it as a
    whole word, as in 'a zqx circle', is kept); returns how many changed."""
    trigger = trigger.strip()
    if not trigger:
        raise UploadError("type a trigger word first, for example 'sks dog'")
    changed = 0
    for item in load_items(folder):
        if with_trigger(item.caption, trigger) != item.caption:
            save_caption(folder, item.name, with_trigger(item.caption, trigger))
            changed += 1
    return changed


def find_replace(folder: Path, find: str, replace: str) -> int:
    """Replace text in every caption; returns the number of captions changed."""
    if not find:
        raise UploadError("type the text to find first")
    items = [item for item in load_items(folder) if find in item.caption]
    for item in items:  # all checked before any is written: a refused replace changes nothing
        _check_caption_size(item.name, item.caption.replace(find, replace))
    for item in items:
        save_caption(folder, item.name, item.caption.replace(find, replace))
    return len(items)


# ----------------------------------------------------------------------------------------------------------------
# uploads

def add_uploads(folder: Path, files: list) -> UploadReport:
    """Copy uploaded images, .txt captions and .zip archives into the dataset with safe, unique names.

    An image the trainer could not read is reported as skipped, with the reason, and not copied. A zip keeps its
    folders (a `10_dog/` folder repeats its images 10 times). A caption is paired with the image of the same
    original name in the upload (renamed with it); a caption for an image already in the dataset is written only
    if that image has none."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    report = UploadReport()
    budget = dataset_budget(folder)
    with tempfile.TemporaryDirectory(prefix="loradesk-upload-") as tmp:
        subfolders: dict[Path, Path] = {}  # an extracted member -> its folder inside the zip
        paths = _expand_zips([upload_path(f) for f in files or []], Path(tmp), report,
                             Budget(budget.left, budget.refusal), subfolders)
        images = [p for p in paths if p.suffix.lower() in IMAGE_EXTENSIONS]
        captions = {(p.parent, p.stem): p for p in paths if p.suffix.lower() in CAPTION_EXTENSIONS}
        for p in paths:
            if p not in images and p.suffix.lower() not in CAPTION_EXTENSIONS:
                kinds = ", ".join(sorted(IMAGE_EXTENSIONS))
                report.skipped.append((p.name, f"not an image ({kinds}), caption or .zip"))
        renamed = _add_images(folder, images, report, budget, subfolders)
        for key, src in captions.items():
            _add_caption(folder / subfolders.get(src, Path()), key, src, renamed, report, budget)
    return report


def _add_images(folder: Path, images: list[Path], report: UploadReport, budget: Budget,
                subfolders: dict[Path, Path]) -> dict:
    renamed = {}
    for src in images:
        try:
            probe_image(src)
            target = folder / subfolders.get(src, Path())
            target.mkdir(parents=True, exist_ok=True)
            dst = unique_path(target, safe_filename(src.name, "image"))
            copy_atomic(src, dst, budget)
        except ImageLoadError as e:
            report.skipped.append((src.name, e.reason))
            continue
        except UploadError as e:
            report.skipped.append((src.name, str(e).split(": ", 1)[-1]))
            continue
        renamed[(src.parent, src.stem)] = dst
        report.added.append(dst.relative_to(folder).as_posix())
    return renamed


def upload_path(f) -> Path:
    """A path from what Gradio hands over: a str/Path, or a file object with .name (older Gradio)."""
    return Path(f) if isinstance(f, (str, Path)) else Path(f.name)


def _expand_zips(paths: list[Path], tmp: Path, report: UploadReport, budget: Budget,
                 subfolders: dict[Path, Path]) -> list[Path]:
    keep = set(IMAGE_EXTENSIONS) | set(CAPTION_EXTENSIONS)
    out = []
    for i, path in enumerate(paths):
        if path.suffix.lower() != ".zip":
            out.append(path)
            continue
        try:
            files, skipped = extract_zip(path, tmp / f"zip{i}", keep, budget)
        except UploadError as e:
            report.skipped.append((path.name, str(e)))
            continue
        subfolders.update({f: f.parent.relative_to(tmp / f"zip{i}") for f in files})
        out += files
        report.skipped += [(f"{path.name}:{n}", r) for n, r in skipped]
    return out


def _add_caption(folder: Path, key: tuple, src: Path, renamed: dict, report: UploadReport, budget: Budget
                 ) -> None:
    """Pair a caption with the image of the same folder and stem in this upload, else with a dataset image."""
    try:
        text = caption_text(src)
        budget.take(len(text.encode("utf-8")) + 1, src.name)
    except UploadError as e:
        report.skipped.append((src.name, str(e).split(": ", 1)[-1]))
        return
    if key in renamed:
        report.captions.append(write_caption(renamed[key], text).name)
        return
    stem = safe_filename(src.name).rsplit(".", 1)[0]
    existing = [p for p in (folder.iterdir() if folder.is_dir() else [])
                if p.stem == stem and p.suffix.lower() in IMAGE_EXTENSIONS]
    if not existing:
        report.skipped.append((src.name, "no image with the same name; upload the image with its caption"))
    elif read_caption(existing[0]).path:
        report.skipped.append((src.name, f"{existing[0].name} already has a caption; edit it in the gallery"))
    else:
        report.captions.append(write_caption(existing[0], text).name)


# ----------------------------------------------------------------------------------------------------------------
# summary: counts, sizes, buckets and skipped files, as the trainer will see them

@dataclass
class Summary:
    text: str
    buckets: list[list]  # [["512x512", 12], ...]
    skipped: list[list]  # [[file, reason], ...]


def summarize(folder: Path, resolution: int = 512, bucket_step: int = 64, seed: int = 42) -> Summary:
    ds = _dataset_section(folder, resolution=resolution, bucket_step=bucket_step)
    try:
        scan = scan_dataset(ds, require_images=False)
    except DatasetError as e:
        return Summary(f"**Not usable yet:** {e}", [], [])
    skipped = [[_rel(s.path, folder), s.reason] for s in scan.skipped]
    if not scan.items:
        return Summary("No usable images yet: drop some on the left.", [], skipped)
    stats = bucket_stats(scan, BatchPlan(scan, ds, seed))
    buckets = [[f"{w}x{h}", n] for (w, h), n in sorted(stats.items(), key=lambda kv: -kv[1])]
    return Summary(_summary_text(scan), buckets, skipped)


def _summary_text(scan) -> str:
    items = scan.items
    uncaptioned = sum(not i.has_caption for i in items)
    sizes = sorted({(i.width, i.height) for i in items}, key=lambda s: s[0] * s[1])
    per_epoch = sum(i.repeats for i in items)
    trigger = (f"Trigger **{scan.trigger}**: put in front of each caption that lacks it." if scan.trigger
               else "No trigger set.")
    lines = [f"**{len(items)} images**, {per_epoch} per epoch with repeats; "
             f"{len(items) - uncaptioned} captioned, {uncaptioned} without caption. {trigger}",
             f"Sizes from {sizes[0][0]}x{sizes[0][1]} to {sizes[-1][0]}x{sizes[-1][1]}."]
    lines += [f"Note: {w}" for w in scan.warnings]
    return "  \n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# captions by a local model: the app's rules around trainer's caption_dataset / preview_captions

CAPTION_MODES = {"auto": None, "sentence": "sentence", "tags": "tags"}  # the tab's choice -> CaptionOptions.mode


def caption_model(text: str, roots: tuple[Path, ...]) -> str:
    """The caption model the box names, as the engine takes it: a folder inside one this app may read (the rule of
    'Import a folder', so the page cannot load or probe any server folder), or a hub name, which the engine fetches
    only where the machine reaches the hub. An existing path outside every allowed folder is refused."""
    text = (text or "").strip()
    if not text:
        raise UploadError("give the caption model's folder (Florence-2, BLIP, Qwen-VL or a WD tagger) or, where "
                          "this machine reaches the model hub, its name such as florence-community/Florence-2-base")
    path = Path(text).expanduser()
    if path.exists() and all(leaves_folder(path, root) for root in roots):
        raise UploadError(f"{text} is not in a folder this app may read; whoever runs it can allow the model's "
                          f"folder with --allow-import DIR (or LORADESK_IMPORT_DIRS)")
    return os.path.realpath(path) if path.is_dir() else text


def caption_options(mode: str | None, prefix: str, suffix: str, overwrite: bool, device: str | None = None):
    """The tab's fields as trainer's CaptionOptions; a prefix and suffix that could not fit a caption are refused
    before a model loads."""
    if (mode or "auto") not in CAPTION_MODES:
        raise UploadError(f"caption mode {mode!r} is not one of {', '.join(CAPTION_MODES)}")
    prefix, suffix = (prefix or "").strip(), (suffix or "").strip()
    if len((prefix + suffix).encode("utf-8")) > MAX_CAPTION_BYTES // 2:
        raise UploadError(f"the prefix and suffix are over {MAX_CAPTION_BYTES // 2048} KB together, which is not "
                          f"a caption; shorten them")
    return CaptionOptions(mode=CAPTION_MODES[mode or "auto"], prefix=prefix, suffix=suffix, overwrite=bool(overwrite),
                          device=device)


def preview_rows(folder: Path, results) -> list[list[str]]:
    """[image, proposed caption, as trained (the trigger rule applied), existing caption] per preview result."""
    return [[_rel_or_name(r.image, folder), r.caption, r.trained, r.previous] for r in results]


def caption_report_text(folder: Path, report, where: str = "") -> str:
    """One status line for a caption run: written, kept, each unreadable image named (the first few)."""
    if not (report.written or report.kept or report.skipped):
        return "No image to caption: drop some on the left."
    parts = [f"Wrote {len(report.written)} caption(s){where}"]
    if report.kept:
        parts.append(f"kept {len(report.kept)} existing (tick 'Replace existing captions' to caption them too)")
    if report.skipped:
        parts.append(skipped_text(folder, [(s.path, s.reason) for s in report.skipped]))
    text = ", ".join(parts) + "."
    if report.trigger and report.written:
        text += f" Training puts the trigger **{report.trigger}** in front of each."
    if report.backup is not None:
        text += f" The captions it replaced are kept in {_rel_or_name(report.backup, folder)}."
    return text


def skipped_text(folder: Path, skipped: list[tuple[Path, str]], shown: int = 5) -> str:
    """'skipped 2: broken.png (reason); ...', dataset-relative names (no server paths)."""
    named = "; ".join(f"{_rel_or_name(path, folder)} ({reason})" for path, reason in skipped[:shown])
    more = f"; and {len(skipped) - shown} more (listed under Skipped files)" if len(skipped) > shown else ""
    return f"skipped {len(skipped)}: {named}{more}"


def short_message(folder: Path, text: str) -> str:
    """An engine message with the dataset folder's server path taken out ('skipped sub/a.png: ...')."""
    for root in sorted({str(folder), os.path.realpath(folder)}, key=len, reverse=True):
        text = text.replace(root + os.sep, "")
    return text


def _rel_or_name(path: Path, folder: Path) -> str:
    try:
        return _rel(path, folder)
    except ValueError:
        return Path(path).name
