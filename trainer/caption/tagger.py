"""WD v3 taggers (SmilingWolf's): an ONNX model scored through onnxruntime, and its selected_tags.csv.

The conventions are kohya's sd-scripts finetune/tag_images_by_wd14_tagger.py (commit 03b35be): the image is padded
to a white square, resized to the model's side, fed as BGR float32 0-255 in NHWC (`preprocess_image`); the csv's
header is tag_id,name,category,count with category 0 general, 4 character, 9 rating; `--remove_underscore` writes
'_' as ' ' in tags longer than 3 characters (so kaomoji such as ^_^ keep theirs); tags are joined with ', '.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from .errors import CaptionError, first_line

GENERAL, CHARACTER, RATING = "0", "4", "9"
CATEGORIES = {"general": GENERAL, "character": CHARACTER, "rating": RATING}
# SmilingWolf's wd-tagger demo defaults: general 0.35, character 0.85; the rating tag is off unless asked for
DEFAULT_THRESHOLDS = {"general": 0.35, "character": 0.85}
DEFAULT_SIDE = 448  # the v3 taggers' input side, when the model's input shape does not say


@dataclass(frozen=True)
class Tag:
    name: str      # as written: underscores already spaces
    category: str  # GENERAL, CHARACTER or RATING


def read_tags(path: Path) -> list[Tag]:
    """selected_tags.csv's rows in order (row i is the model's output i)."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise CaptionError(f"{path} cannot be read ({e}); download the tagger's selected_tags.csv again") from None
    if not rows or [c.strip() for c in rows[0][:3]] != ["tag_id", "name", "category"]:
        raise CaptionError(f"{path} does not start with the header tag_id,name,category: it is not a WD tagger's "
                           f"tag list; download selected_tags.csv again")
    try:
        return [Tag(tag_text(row[1]), row[2].strip()) for row in rows[1:] if row]
    except IndexError:
        raise CaptionError(f"{path} has a row with fewer than 3 columns; download selected_tags.csv again") from None


def tag_text(name: str) -> str:
    """A tag as written in a caption: underscores become spaces, except in tags of 3 characters or fewer
    (kaomoji: ^_^, o_o), as kohya's --remove_underscore does."""
    return name.replace("_", " ") if len(name) > 3 else name


def check_thresholds(thresholds: dict[str, float] | None) -> dict[str, float]:
    """The defaults updated by `thresholds` (general, character, rating: each in 0..1)."""
    out = dict(DEFAULT_THRESHOLDS)
    for key, value in (thresholds or {}).items():
        if key not in CATEGORIES:
            raise CaptionError(f"threshold {key!r} is not a tag category: use general, character or rating")
        if not 0.0 <= float(value) <= 1.0:  # NaN fails this too
            raise CaptionError(f"threshold {key}={value} is outside 0..1: a tag is written when its score reaches it")
        out[key] = float(value)
    return out


def pick_tags(scores, tags: list[Tag], thresholds: dict[str, float]) -> list[str]:
    """The tags one image's scores give: the top rating tag (only when a rating threshold is set and it reaches
    it), then characters and general tags at or over their thresholds, each group highest score first."""
    picked = []
    rating = [(float(scores[i]), t.name) for i, t in enumerate(tags) if t.category == RATING]
    if "rating" in thresholds and rating:
        score, name = max(rating)
        if score >= thresholds["rating"]:
            picked.append(name)
    for key in ("character", "general"):
        code, limit = CATEGORIES[key], thresholds[key]
        found = [(float(scores[i]), t.name) for i, t in enumerate(tags) if t.category == code and scores[i] >= limit]
        picked += [name for _, name in sorted(found, key=lambda pair: -pair[0])]
    return list(dict.fromkeys(picked))  # a tag twice in the csv is written once


class WdTagger:
    """A loaded WD tagger: `caption(images)` -> one comma-separated tag string per PIL image."""
    kind = "wd-tagger"
    mode = "tags"

    def __init__(self, folder: Path, device: str | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise CaptionError("a WD tagger runs on onnxruntime, which is not installed: pip install "
                               "'loradesk[caption]' (or onnxruntime-gpu for a GPU)") from None
        self.tags = read_tags(folder / "selected_tags.csv")
        self.thresholds = check_thresholds(None)
        providers = ["CPUExecutionProvider"]
        if device != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(folder / "model.onnx"), providers=providers)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types for damaged or foreign files
            raise CaptionError(f"{folder / 'model.onnx'} cannot be loaded by onnxruntime ({first_line(e)}); "
                               f"download the tagger again") from None
        self._check_outputs(folder)
        shape = self.session.get_inputs()[0].shape  # [batch, side, side, 3]
        self.side = shape[1] if isinstance(shape[1], int) and shape[1] > 0 else DEFAULT_SIDE
        # some exports fix the batch at 1 (kohya's tagger reads dim 0 the same way)
        self.fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None

    def configure(self, prompt: str | None = None, thresholds: dict[str, float] | None = None) -> None:
        """Set the thresholds of the next captions (None: the defaults); a tagger takes no prompt."""
        if prompt:
            raise CaptionError("a WD tagger takes no prompt; leave --prompt out")
        self.thresholds = check_thresholds(thresholds)

    def _check_outputs(self, folder: Path) -> None:
        dims = self.session.get_outputs()[0].shape
        if len(dims) == 2 and isinstance(dims[1], int) and dims[1] != len(self.tags):
            raise CaptionError(f"{folder / 'model.onnx'} scores {dims[1]} tags but selected_tags.csv lists "
                               f"{len(self.tags)}: the two files are from different taggers")

    def caption(self, images: list) -> list[str]:
        import numpy as np
        step = self.fixed_batch or len(images)
        name = self.session.get_inputs()[0].name
        out = []
        for start in range(0, len(images), step):
            batch = np.stack([self.prepare(im) for im in images[start:start + step]])
            scores = self.session.run(None, {name: batch})[0]
            out += [", ".join(pick_tags(row, self.tags, self.thresholds)) for row in scores]
        return out

    def prepare(self, image):
        """PIL RGB -> the model's input: padded to a white square, resized to its side, BGR float32 0..255."""
        import numpy as np
        from PIL import Image
        side = max(image.size)
        square = Image.new("RGB", (side, side), (255, 255, 255))
        square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        # kohya: cv2 INTER_AREA when shrinking, PIL otherwise; PIL's BOX filter is area averaging too
        resample = Image.Resampling.BOX if side > self.side else Image.Resampling.BICUBIC
        pixels = np.asarray(square.resize((self.side, self.side), resample), dtype=np.float32)
        return np.ascontiguousarray(pixels[:, :, ::-1])  # RGB -> BGR

