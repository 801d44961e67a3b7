"""Captioning a dataset folder: which images get a caption, batches through a captioner, atomic writes.

The images are the ones training reads (trainer.data.scan_dataset: subfolders, links out refused, unreadable files
named), and each caption is written where training reads it (trainer.data.write_caption, atomic). A caption is
written without the trigger, as a typed one is: training puts the dataset's trigger in front by the one rule
(trainer.data.with_trigger), and each result's `trained` shows that text.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from trainer.atomic import write_text_atomic
from trainer.data import (ImageLoadError, Skipped, caption_file, load_image, read_caption, scan_dataset, with_trigger,
                          write_caption)

from .detect import find_caption_model
from .errors import CaptionError

# where --overwrite keeps the captions it replaces (hidden: never scanned as part of the dataset, data.is_ignored)
BACKUP_FOLDER = ".caption-backup"
NO_TEXT = "the captioner gave no text (a tagger: no tag reached its threshold); nothing written"


@dataclass(frozen=True)
class CaptionResult:
    image: Path
    caption: str          # as written: prefix, the model's text, suffix; no trigger (as a typed caption)
    trained: str          # what training reads: the trigger in front by the dataset's rule
    previous: str = ""    # the caption the image had ("" for none)
    file: Path | None = None  # the caption file written; None in a preview


@dataclass
class CaptionReport:
    written: list[CaptionResult] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)         # images whose caption was kept (no --overwrite)
    skipped: list[Skipped] = field(default_factory=list)   # unreadable images, or no text: each with its reason
    trigger: str = ""
    backup: Path | None = None  # with overwrite: the folder holding copies of the captions it replaced


@dataclass(frozen=True)
class CaptionOptions:
    """How captions are made and written (the CLI's flags, the app's fields, a queued caption job's settings)."""
    mode: str | None = None           # 'sentence' or 'tags'; None: what the model writes
    prefix: str = ""                  # joined in front with ', '
    suffix: str = ""                  # joined after with ', '
    overwrite: bool = False           # replace existing captions (else they are kept)
    batch_size: int = 4
    thresholds: dict | None = None    # a tagger's per category: general, character, rating
    prompt: str | None = None         # Florence-2's task, BLIP's text to continue, Qwen-VL's request
    device: str | None = None         # None: the GPU when there is one


def load_captioner(model, options: CaptionOptions = CaptionOptions()):
    """A loaded captioner (`.kind`, `.mode`, `.caption(images) -> list[str]`) for a folder or hub name, set to
    the options' prompt or thresholds. A loaded one is set and returned (the app loads once for a preview and the
    run); its device stays the one it was loaded on."""
    if not hasattr(model, "caption"):
        found = find_caption_model(model)
        if found.kind == "wd-tagger":
            from .tagger import WdTagger
            model = WdTagger(found.path, options.device)
        else:
            from .vlm import TransformersCaptioner
            model = TransformersCaptioner(found.path, found.kind, options.device)
    model.configure(options.prompt, options.thresholds)
    return model


def caption_dataset(dataset: str | Path, model, options: CaptionOptions = CaptionOptions(),
                    progress: Callable[[int, int], None] | None = None,
                    message: Callable[[str], None] | None = None) -> CaptionReport:
    """Caption every image of `dataset` that has no caption (every image with overwrite), writing each file
    atomically. progress(done, total) after each batch; message(text) once per skipped image, naming it."""
    return _run(dataset, model, options, progress, message, limit=None, write=True)


def preview_captions(dataset: str | Path, model, n: int = 4, options: CaptionOptions = CaptionOptions(),
                     progress=None, message=None) -> list[CaptionResult]:
    """The captions the first `n` images to caption would get, without writing anything."""
    return _run(dataset, model, options, progress, message, limit=max(0, int(n)), write=False).written


def _run(dataset, model, options, progress, message, limit, write) -> CaptionReport:
    _check_options(options)
    todo, report = _plan(dataset, options.overwrite)
    for s in report.skipped:
        _say(message, f"skipped {s.path}: {s.reason}")
    todo = todo if limit is None else todo[:limit]
    if not todo:
        return report
    captioner = load_captioner(model, options)
    _check_mode(captioner, options.mode)
    done = 0
    for start in range(0, len(todo), options.batch_size):
        batch = todo[start:start + options.batch_size]
        for result in _caption_batch(captioner, batch, options, report, message):
            if write and not options.overwrite and _typed_since_scan(result.image):
                _keep(report, message, result.image)
            else:
                if write:
                    _back_up(report, Path(dataset), result.image)
                report.written.append(_write(result) if write else result)
        done += len(batch)
        if progress is not None:
            progress(done, len(todo))
    return report


def _check_options(options: CaptionOptions) -> None:
    if options.mode not in (None, "sentence", "tags"):
        raise CaptionError(f"--mode {options.mode!r} is not a caption mode: use sentence or tags")
    if not isinstance(options.batch_size, int) or options.batch_size < 1:
        raise CaptionError(f"--batch-size {options.batch_size} must be a whole number of at least 1")


def _check_mode(captioner, mode: str | None) -> None:
    if mode is not None and mode != captioner.mode:
        need = "a WD tagger (model.onnx + selected_tags.csv)" if mode == "tags" else "Florence-2, BLIP or Qwen-VL"
        raise CaptionError(f"--mode {mode} needs {need}; this model ({captioner.kind}) writes {captioner.mode} "
                           f"captions: leave --mode out or choose another --model")


def _plan(dataset, overwrite: bool) -> tuple[list, CaptionReport]:
    """(the scanned items to caption, a report holding the trigger, the kept and the unreadable images)."""
    from trainer.config import DatasetSection
    scan = scan_dataset(DatasetSection(path=str(dataset)), require_images=False)
    report = CaptionReport(skipped=list(scan.skipped), trigger=scan.trigger)
    todo = []
    for item in scan.items:
        if item.caption.strip() and not overwrite:
            report.kept.append(item.path)
        else:
            todo.append(item)
    return todo, report


def _caption_batch(captioner, items, options, report, message) -> list[CaptionResult]:
    """The batch's results; an image that cannot be read now (changed since the scan) is skipped by name."""
    loaded = []
    for item in items:
        try:
            loaded.append((item, load_image(item.path)))
        except ImageLoadError as e:
            _skip(report, message, item.path, e.reason)
    texts = captioner.caption([image for _, image in loaded]) if loaded else []
    results = []
    for (item, _), text in zip(loaded, texts):
        caption = _join(options.prefix, text.strip(), options.suffix) if text.strip() else ""
        if not caption:
            _skip(report, message, item.path, NO_TEXT)
            continue
        results.append(CaptionResult(item.path, caption, with_trigger(caption, report.trigger), item.caption))
    return results


def _join(*parts: str) -> str:
    return ", ".join(p.strip().strip(",").strip() for p in parts if p.strip().strip(","))


def _typed_since_scan(image: Path) -> bool:
    """Whether the image has a caption now. The scan chose the images to caption once, but a queued job runs for
    hours while the user may type captions in the Dataset tab: without --overwrite a typed one is kept, so the file
    is read again just before writing (a gone file is no caption)."""
    try:
        return bool(read_caption(image).text.strip())
    except FileNotFoundError:  # removed between finding and reading it
        return False


def _keep(report: CaptionReport, message, image: Path) -> None:
    report.kept.append(image)
    _say(message, f"kept {image}: its caption was written while captioning ran (--overwrite replaces it)")


def _back_up(report: CaptionReport, dataset: Path, image: Path) -> None:
    """A caption about to be replaced is copied first (atomically) under DATASET/.caption-backup/<time>/, at its
    path in the dataset: typed work is never lost to --overwrite."""
    old = caption_file(image)
    text = old.read_text(encoding="utf-8", errors="replace") if old.is_file() else ""
    if not text.strip():
        return
    if report.backup is None:
        import time
        report.backup = dataset / BACKUP_FOLDER / time.strftime("%Y%m%d-%H%M%S")
    write_text_atomic(report.backup / old.resolve().relative_to(dataset.resolve()), text)


def _write(result: CaptionResult) -> CaptionResult:
    file = write_caption(result.image, result.caption)
    return CaptionResult(result.image, result.caption, result.trained, result.previous, file)


def _skip(report: CaptionReport, message, path: Path, reason: str) -> None:
    report.skipped.append(Skipped(path, reason))
    _say(message, f"skipped {path}: {reason}")


def _say(message, text: str) -> None:
    if message is not None:
        message(text)
