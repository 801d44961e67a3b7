"""Caption files, the trigger word, tag shuffling and caption dropout (kohya's conventions)."""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

CAPTION_EXTENSIONS = (".txt", ".caption")  # looked up in this order next to each image


@dataclass(frozen=True)
class CaptionFile:
    """What was read next to one image. `issues` are short keys the scan groups into warnings."""
    text: str
    path: Path | None
    issues: tuple[str, ...] = ()


def read_caption(image_path: Path) -> CaptionFile:
    """The same-name .txt (else .caption) file, lines joined with ', ' and whitespace tidied; '' if none."""
    found = [p for p in (image_path.with_suffix(ext) for ext in CAPTION_EXTENSIONS) if p.is_file()]
    if not found:
        return CaptionFile("", None)
    issues = ("both_caption_files",) if len(found) > 1 else ()
    raw = found[0].read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:  # old Windows editors: cp1252 holds what people type, latin-1 never fails
        text = _decode_legacy(raw)
        issues += ("not_utf8",)
    return CaptionFile(_tidy(text), found[0], issues)


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


def build_caption(item, ds, rng: random.Random) -> str:
    """The caption trained at one step: '' with probability caption_dropout, else trigger-prefixed (never for a
    regularization image) and, when shuffle_tags is on, tag-shuffled with the first keep_tokens tags (the trigger is
    the first) kept in place."""
    if ds.caption_dropout > 0 and rng.random() < ds.caption_dropout:
        return ""
    caption = item.caption if item.regularization else with_trigger(item.caption, ds.trigger)
    if ds.shuffle_tags:
        caption = shuffle_tags(caption, ds.keep_tokens, rng)
    return caption
