"""Caption files, the trigger word, tag shuffling and caption dropout (kohya's conventions)."""
from __future__ import annotations

import codecs
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

from trainer.paths import expand_path

from .errors import DatasetError

CAPTION_EXTENSIONS = (".txt", ".caption")  # looked up in this order next to each image
DATASET_FILE = "loradesk-dataset.toml"  # in a dataset folder: its own settings (the trigger the app's Dataset tab sets)


@dataclass(frozen=True)
class CaptionFile:
    """What was read next to one image. `issues` are short keys the scan groups into warnings."""
    text: str
    path: Path | None
    issues: tuple[str, ...] = ()


def read_caption(image_path: Path) -> CaptionFile:
    """The same-name .txt (else .caption) file, lines joined with ', ' and whitespace tidied; '' if none. A caption
    that is a link out of its image's folder is not one (it could point at any file on the machine)."""
    found = _caption_files(Path(image_path))
    if not found:
        return CaptionFile("", None)
    issues = ("both_caption_files",) if len(found) > 1 else ()
    text, legacy = decode_caption(found[0].read_bytes())
    return CaptionFile(text, found[0], issues + (("not_utf8",) if legacy else ()))


# Byte order marks, UTF-32's first: its little-endian one starts with UTF-16's (Windows Notepad saved "Unicode"
# as UTF-16 LE with a BOM; read as Windows-1252 its BOM and NUL bytes became part of the caption).
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF16_LE, "utf-16"),
         (codecs.BOM_UTF16_BE, "utf-16"))


def decode_caption(raw: bytes) -> tuple[str, bool]:
    """Caption text from a file's bytes, tidied as it is trained; True when it was not UTF-8 (nor UTF-16 or UTF-32
    with a byte order mark) and was read as Windows-1252."""
    for bom, codec in _BOMS:
        if raw.startswith(bom):  # a damaged tail (half a character) becomes one U+FFFD, not a wrong encoding
            return _tidy(raw.decode(codec, errors="replace")), False
    try:
        return _tidy(raw.decode("utf-8-sig")), False
    except UnicodeDecodeError:  # old Windows editors: cp1252 holds what people type, latin-1 never fails
        return _tidy(_decode_legacy(raw)), True


def caption_file(image_path: Path) -> Path:
    """The file an image's caption is written to: its existing caption file (in CAPTION_EXTENSIONS order), else a
    new same-name .txt."""
    found = _caption_files(Path(image_path))
    return found[0] if found else image_path.with_suffix(".txt")


def _caption_files(image_path: Path) -> list[Path]:
    folder = os.path.realpath(image_path.parent)
    return [p for p in (image_path.with_suffix(ext) for ext in CAPTION_EXTENSIONS)
            if p.is_file() and os.path.dirname(os.path.realpath(p)) == folder]


def write_caption(image_path: Path, text: str) -> Path:
    """Save an image's caption as UTF-8 (atomically) where read_caption() will find it; returns the file."""
    from trainer.atomic import write_text_atomic
    return write_text_atomic(caption_file(Path(image_path)), text.strip() + "\n")


MAX_DATASET_FILE_BYTES = 64 * 1024  # a trigger and a comment; anything larger is not this file


def dataset_trigger(folder: str | Path, strict: bool = False) -> str:
    """The trigger saved in a dataset folder's loradesk-dataset.toml ("" when none, or when the file is damaged:
    the trigger is a convenience, and the config's dataset.trigger still wins). strict: a damaged file raises
    DatasetError naming it (an import must not carry a damaged file into a new dataset)."""
    import tomllib
    path = expand_path(folder) / DATASET_FILE
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_DATASET_FILE_BYTES + 1)
        if len(raw) > MAX_DATASET_FILE_BYTES:
            raise ValueError(f"over {MAX_DATASET_FILE_BYTES // 1024} KB")
        value = tomllib.loads(raw.decode("utf-8-sig")).get("trigger", "")  # Notepad's UTF-8 starts with a BOM
        if not isinstance(value, str):
            raise ValueError("its trigger is not text")
    except FileNotFoundError:
        return ""
    except (OSError, ValueError) as e:  # UnicodeDecodeError and TOMLDecodeError are ValueErrors
        if strict:
            why = (e.strerror if isinstance(e, OSError) and e.strerror else
                   "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else str(e).splitlines()[0])
            raise DatasetError(f"{path} is damaged ({why}); set the trigger again in the Dataset tab") from None
        return ""
    return value.strip()


def set_dataset_trigger(folder: str | Path, trigger: str) -> Path:
    """Save the dataset folder's own trigger (the one place the app keeps it)."""
    import json
    from trainer.atomic import write_text_atomic
    text = (f"# loradesk: settings of this dataset folder\ntrigger = {json.dumps(trigger.strip(), ensure_ascii=False)}"
            "\n")
    return write_text_atomic(expand_path(folder) / DATASET_FILE, text)


def resolve_trigger(ds) -> str:
    """The trigger a run uses: dataset.trigger, or when that is empty the dataset folder's own."""
    return ds.trigger.strip() or (dataset_trigger(ds.path) if str(ds.path).strip() else "")


def _decode_legacy(raw: bytes) -> str:
    try:
        return raw.decode("cp1252")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _tidy(text: str) -> str:
    lines = (" ".join(line.split()).strip(" ,") for line in text.splitlines())
    return ", ".join(line for line in lines if line)


def split_tags(caption: str) -> list[str]:
    """Comma-separated parts, stripped, empties dropped."""
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def with_trigger(caption: str, trigger: str) -> str:
    """'trigger, caption', unless the caption already holds the trigger as a whole word (any case), as in
    'a zqx circle' where the trigger stands in for a word."""
    trigger = trigger.strip()
    if not trigger:
        return caption
    if not caption:
        return trigger
    if re.search(r"(?<!\w)" + re.escape(trigger) + r"(?!\w)", caption, flags=re.IGNORECASE):
        return caption
    return f"{trigger}, {caption}"


def shuffle_tags(caption: str, keep: int, rng: random.Random) -> str:
    """Shuffle the comma-separated tags after the first `keep`, which stay in place."""
    tags = split_tags(caption)
    head, tail = tags[:keep], tags[keep:]
    rng.shuffle(tail)
    return ", ".join(head + tail)


def build_caption(item, ds, rng: random.Random, trigger: str | None = None) -> str:
    """The caption trained at one step: '' with probability caption_dropout, else trigger-prefixed (never for a
    regularization image) and, when shuffle_tags is on, tag-shuffled with the first keep_tokens tags (the trigger is
    the first) kept in place. `trigger`: the resolved one (DatasetScan.trigger); default ds.trigger."""
    if ds.caption_dropout > 0 and rng.random() < ds.caption_dropout:
        return ""
    trigger = ds.trigger if trigger is None else trigger
    caption = item.caption if item.regularization else with_trigger(item.caption, trigger)
    if ds.shuffle_tags:
        caption = shuffle_tags(caption, ds.keep_tokens, rng)
    return caption
