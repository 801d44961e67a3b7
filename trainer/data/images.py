"""Read one image the way training needs it: upright (EXIF), 8-bit RGB, transparency on white, damage refused."""
from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path

from PIL import Image, ImageFile, UnidentifiedImageError

from .errors import ImageLoadError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".jfif", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif"})

_EXIF_ORIENTATION = 0x0112
T = Image.Transpose
# The transposes of EXIF orientations 2..8 (the same table as ImageOps.exif_transpose, which we do not call because
# a malformed tag makes it raise, and a bad tag should not drop a good image).
_UPRIGHT = {2: T.FLIP_LEFT_RIGHT, 3: T.ROTATE_180, 4: T.FLIP_TOP_BOTTOM, 5: T.TRANSPOSE, 6: T.ROTATE_270,
            7: T.TRANSVERSE, 8: T.ROTATE_90}
_SIDES_SWAPPED = {5, 6, 7, 8}
_ALPHA_MODES = {"RGBA", "LA", "PA"}
_HIGH_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}


def is_image_file(path: Path) -> bool:
    """An image by its extension; hidden files (including macOS '._name' sidecars) are not."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def load_image(path: str | Path) -> Image.Image:
    """The image as trained: EXIF-upright RGB. Raises ImageLoadError (naming the file) for unreadable files."""
    path = Path(path)
    img, _ = _decode(path, fast=False)
    return to_rgb(_upright(img))


def probe_image(path: str | Path) -> tuple[int, int]:
    """(width, height) after EXIF rotation. Decodes the whole file (JPEGs at 1/8 scale) so damage shows now."""
    path = Path(path)
    img, (width, height) = _decode(path, fast=True)
    try:
        to_rgb(img)
    except Exception as e:  # an exotic mode PIL cannot convert: report it now, not mid-training
        raise ImageLoadError(path, f"colour mode {img.mode} cannot be converted to RGB ({e})") from None
    return (height, width) if _orientation(img) in _SIDES_SWAPPED else (width, height)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any mode -> 8-bit RGB: transparency composited on white; 16/32-bit scaled down (PIL's convert clips them)."""
    if img.mode in _HIGH_BIT_MODES:
        img = _scale_to_8bit(img)
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        return _on_white(img.convert("RGBA"))
    return img if img.mode == "RGB" else img.convert("RGB")


def _on_white(rgba: Image.Image) -> Image.Image:
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _scale_to_8bit(img: Image.Image) -> Image.Image:
    """Map 16-bit (or 32-bit int / float) grey to 0..255 by its nominal range, so 65535 is white, not clipped."""
    import numpy as np

    values = np.asarray(img).astype(np.float64)
    top = float(values.max()) if values.size else 0.0
    if img.mode.startswith("I;16"):
        full = 65535.0
    elif img.mode == "F" and top <= 1.0:
        full = 1.0
    else:  # "I" or "F" above 1: the smallest usual range that holds the data
        full = 255.0 if top <= 255 else 65535.0 if top <= 65535 else top
    grey = np.clip(np.rint(values * (255.0 / full)), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, "L")


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # malformed EXIF: treat as upright rather than drop the image
        return 1
    return value if value in _UPRIGHT else 1


def _upright(img: Image.Image) -> Image.Image:
    method = _UPRIGHT.get(_orientation(img))
    return img.transpose(method) if method is not None else img


def _decode(path: Path, fast: bool) -> tuple[Image.Image, tuple[int, int]]:
    """Open and fully decode the first frame; returns the image and its stored size (before any draft scaling)."""
    try:
        if path.stat().st_size == 0:
            raise ImageLoadError(path, "empty file (0 bytes)")
        with path.open("rb") as f, _refuse_truncated():
            img = Image.open(f)
            size = img.size
            if fast and img.format == "JPEG":
                img.draft(None, (1, 1))  # decode at 1/8 scale: every byte is still read, so truncation shows
            img.load()
            return img, size
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not an image Pillow can read (the content does not match the extension, "
                                   "or the file is damaged)") from None
    except Image.DecompressionBombError as e:
        raise ImageLoadError(path, f"too large to decode safely ({e})") from None
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, struct.error...) for damaged files
        raise ImageLoadError(path, _damage_reason(e)) from None


def _damage_reason(error: Exception) -> str:
    text = str(error) or type(error).__name__
    if "truncated" in text.lower():
        return "truncated: the file ends early (copy or export it again)"
    if isinstance(error, PermissionError):
        return "permission denied"
    return f"cannot be decoded ({text})"


_guard_lock = threading.Lock()
_guard_depth = 0
_guard_saved = False


@contextmanager
def _refuse_truncated():
    """Keep PIL's process-wide LOAD_TRUNCATED_IMAGES off while we decode (another library may have turned it on,
    and then a truncated file would load with grey padding). Reference-counted so parallel scans stay strict."""
    global _guard_depth, _guard_saved
    with _guard_lock:
        if _guard_depth == 0:
            _guard_saved = ImageFile.LOAD_TRUNCATED_IMAGES
            ImageFile.LOAD_TRUNCATED_IMAGES = False
        _guard_depth += 1
    try:
        yield
    finally:
        with _guard_lock:
            _guard_depth -= 1
            if _guard_depth == 0:
                ImageFile.LOAD_TRUNCATED_IMAGES = _guard_saved
