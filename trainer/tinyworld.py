"""tinyworld: a procedural, seeded world of captioned 64x64 images.

Every image is one flat-coloured shape on a flat background of another colour, with the caption
``a {colour} {shape} on a {colour} background``. The world is the training data of the bundled tiny
Stable Diffusion base model (``trainer/assets/tiny-sd``) and the yardstick of its quality tests.

The module also holds:

* ``classify(image)``: a simple pixel-statistics classifier that reads (background, foreground, shape)
  back from an image. It scores 100% on real world images (see ``tests/test_tinyworld.py``).
* the demo concept (``examples/demo-concept``): objects of a colour the world never contains, hot pink, named
  by the rare word ``zqx`` (``a zqx circle on a blue background``); ``concept_score(image)`` measures how much
  of an image's object has that colour and ``colour_drift(a, b)`` how far two images' colour make-up differs.

Only the standard library, numpy and PIL are used (torch is not even needed); importing this module does
not import diffusers.
"""

from __future__ import annotations

import random
import re
from collections import Counter, deque
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "IMAGE_SIZE",
    "PALETTE",
    "COLOURS",
    "SHAPES",
    "DEMO_TRIGGER",
    "DEMO_RGB",
    "MIN_SIZE",
    "MAX_SIZE",
    "Sample",
    "caption_for",
    "parse_caption",
    "draw_shape",
    "render",
    "random_sample",
    "iter_samples",
    "generate_samples",
    "write_dataset",
    "nearest_colour_map",
    "foreground_mask",
    "classify",
    "demo_caption",
    "render_demo",
    "colour_shares",
    "concept_score",
    "colour_drift",
]

IMAGE_SIZE = 64

#: name -> RGB. Chosen to be far apart from each other in RGB space.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 20),
    "green": (20, 170, 40),
    "blue": (30, 50, 230),
    "yellow": (250, 230, 30),
    "purple": (140, 30, 170),
    "orange": (250, 130, 0),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

#: The demo concept (``examples/demo-concept``): a colour the base world never contains, named by a rare word.
#: (A new shape, a star, was the first demo: the tiny base draws soft blobs, and no LoRA within the two-minute
#: budget taught it crisp star points; a colour is what this model renders reliably.)
DEMO_TRIGGER = "zqx"
DEMO_RGB = (255, 100, 180)  # hot pink: at least 135 RGB units from every palette colour

#: Side of the shape's bounding box, in pixels (inclusive range). The minimum keeps ``classify`` exact.
MIN_SIZE = 20
MAX_SIZE = 44

_PALETTE_ARR = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32)  # (8, 3)


class Sample(tuple):
    """A generated sample: ``(image, caption, background, foreground, shape)``; fields also by name."""

    __slots__ = ()

    def __new__(cls, image: Image.Image, caption: str, background: str, foreground: str, shape: str):
        return super().__new__(cls, (image, caption, background, foreground, shape))

    image = property(lambda self: self[0])
    caption = property(lambda self: self[1])
    background = property(lambda self: self[2])
    foreground = property(lambda self: self[3])
    shape = property(lambda self: self[4])


# ----------------------------------------------------------------------------------------------------------------
# captions

def caption_for(background: str, foreground: str, shape: str, trigger: str | None = None) -> str:
    """``a {foreground} {shape} on a {background} background``, optionally prefixed by ``"{trigger}, "``."""
    text = f"a {foreground} {shape} on a {background} background"
    return f"{trigger}, {text}" if trigger else text


_CAPTION_RE = re.compile(r"an?\s+(\w+)\s+(\w+)\s+on\s+an?\s+(\w+)\s+background")


def parse_caption(caption: str) -> tuple[str, str, str]:
    """Parse a caption back into ``(background, foreground, shape)``.

    A leading trigger word (``"zqx, a red star on a blue background"``) is ignored. Raises ``ValueError`` when the
    caption does not have the world's form.
    """
    m = _CAPTION_RE.search(caption.strip().lower())
    if not m:
        raise ValueError(f"not a tinyworld caption: {caption!r}")
    fg, shape, bg = m.group(1), m.group(2), m.group(3)
    return bg, fg, shape


# ----------------------------------------------------------------------------------------------------------------
# rendering

def draw_shape(draw: ImageDraw.ImageDraw, shape: str, x: int, y: int, size: int, fill) -> None:
    """Draw ``shape`` with its ``size`` x ``size`` bounding box at top-left (x, y). No anti-aliasing."""
    x1, y1 = x + size - 1, y + size - 1
    if shape == "circle":
        draw.ellipse([x, y, x1, y1], fill=fill)
    elif shape == "square":
        draw.rectangle([x, y, x1, y1], fill=fill)
    elif shape == "triangle":  # upright isosceles, base = height = size
        draw.polygon([(x + (size - 1) / 2, y), (x1, y1), (x, y1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render(background: str, foreground: str, shape: str, size: int, x: int, y: int) -> Image.Image:
    """Render one 64x64 RGB image."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), PALETTE[background])
    draw_shape(ImageDraw.Draw(img), shape, x, y, size, PALETTE[foreground])
    return img


def random_sample(rng: random.Random, shapes: Sequence[str] = SHAPES, trigger: str | None = None,
                  min_size: int = MIN_SIZE, max_size: int = MAX_SIZE) -> Sample:
    """Draw one random sample with ``rng`` (a ``random.Random``): shape, colours, size and position."""
    shape = rng.choice(list(shapes))
    fg = rng.choice(COLOURS)
    bg = rng.choice([c for c in COLOURS if c != fg])
    size = rng.randint(min_size, max_size)
    x = rng.randint(0, IMAGE_SIZE - size)
    y = rng.randint(0, IMAGE_SIZE - size)
    return Sample(render(bg, fg, shape, size, x, y), caption_for(bg, fg, shape, trigger), bg, fg, shape)


def iter_samples(seed: int, shapes: Sequence[str] = SHAPES, trigger: str | None = None) -> Iterator[Sample]:
    """Endless, reproducible stream of samples for ``seed``."""
    rng = random.Random(seed)
    while True:
        yield random_sample(rng, shapes=shapes, trigger=trigger)


def generate_samples(n: int, seed: int = 0, shapes: Sequence[str] = SHAPES,
                     trigger: str | None = None) -> list[Sample]:
    """The first ``n`` samples of ``iter_samples(seed, ...)``."""
    it = iter_samples(seed, shapes=shapes, trigger=trigger)
    return [next(it) for _ in range(n)]


QUALITY_PROMPT_SEED = 20240611  # the model card's numbers, the build's final evaluation and the quality test
QUALITY_PROMPTS = 48


def quality_prompts(n: int = QUALITY_PROMPTS, seed: int = QUALITY_PROMPT_SEED) -> list[tuple[str, tuple, int]]:
    """The fixed quality-test prompts: ``(prompt, (background, foreground, shape), generator seed)``."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        shape = rng.choice(SHAPES)
        fg = rng.choice(COLOURS)
        bg = rng.choice([c for c in COLOURS if c != fg])
        out.append((caption_for(bg, fg, shape), (bg, fg, shape), seed + i))
    return out


#: Prompts without the trigger whose drift the demo test measures; the demo's regularization set never holds them,
#: so the test measures how the prior holds on prompts it was not shown.
DRIFT_PROMPTS = ("a red circle on a blue background", "a yellow square on a black background",
                 "a white triangle on a green background")


def write_dataset(folder: str | Path, n: int, seed: int = 0, shapes: Sequence[str] = SHAPES,
                  trigger: str | None = None, prefix: str = "img") -> list[Path]:
    """Write ``n`` samples as ``{prefix}_{i:04d}.png`` + same-name ``.txt`` captions; returns the png paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, s in enumerate(generate_samples(n, seed=seed, shapes=shapes, trigger=trigger)):
        p = folder / f"{prefix}_{i:04d}.png"
        s.image.save(p)
        p.with_suffix(".txt").write_text(s.caption + "\n", encoding="utf-8")
        paths.append(p)
    return paths


# ----------------------------------------------------------------------------------------------------------------
# the classifier

def _to_array(image) -> np.ndarray:
    """PIL image, or HxWx3 array (uint8 0..255 or float 0..1) -> float32 HxWx3 in 0..255."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    arr = arr.astype(np.float32)
    if arr.max() <= 1.0 + 1e-6:
        arr = arr * 255.0
    return arr


def _nearest_index(image, palette: np.ndarray) -> np.ndarray:
    """HxW int array: index into ``palette`` (Kx3) of the nearest colour (RGB distance) of each pixel."""
    arr = _to_array(image)
    return ((arr[:, :, None, :] - palette[None, None]) ** 2).sum(-1).argmin(-1)


def nearest_colour_map(image) -> np.ndarray:
    """HxW int array: index into ``COLOURS`` of the nearest palette colour (RGB distance) of each pixel."""
    return _nearest_index(image, _PALETTE_ARR)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 4-connected component of a boolean mask (pure Python BFS; images are 64x64)."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    best: list[tuple[int, int]] = []
    ys, xs = np.nonzero(mask)
    for sy, sx in zip(ys.tolist(), xs.tolist()):
        if seen[sy, sx]:
            continue
        comp = []
        q = deque([(sy, sx)])
        seen[sy, sx] = True
        while q:
            cy, cx = q.popleft()
            comp.append((cy, cx))
            for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    q.append((ny, nx))
        if len(comp) > len(best):
            best = comp
    out = np.zeros_like(mask, dtype=bool)
    if best:
        yy, xx = zip(*best)
        out[list(yy), list(xx)] = True
    return out


def _background_index(idx: np.ndarray) -> int:
    border = np.concatenate([idx[0, :], idx[-1, :], idx[:, 0], idx[:, -1]])
    return Counter(border.tolist()).most_common(1)[0][0]


def foreground_mask(image) -> tuple[np.ndarray, str | None, str | None]:
    """``(mask, background, foreground)``: the foreground object's mask and the two colour names.

    * background = the most common nearest-palette colour of the 1-pixel image border;
    * foreground = the most common nearest-palette colour among the pixels that are not background
      (``None`` if every pixel is background);
    * mask = the largest 4-connected component of the pixels of the foreground colour.
    """
    idx = nearest_colour_map(image)
    bg = _background_index(idx)
    rest = idx[idx != bg]
    if rest.size == 0:
        return np.zeros(idx.shape, dtype=bool), COLOURS[bg], None
    fg = Counter(rest.tolist()).most_common(1)[0][0]
    return _largest_component(idx == fg), COLOURS[bg], COLOURS[fg]


#: bounding-box fill ratio thresholds: triangle ~0.5 | circle ~0.785 | square 1.0
_TRIANGLE_CIRCLE_SPLIT = 0.65
_CIRCLE_SQUARE_SPLIT = 0.90


def classify(image) -> tuple[str, str | None, str | None]:
    """Read ``(background_colour, foreground_colour, shape)`` back from an image by pixel statistics.

    ``image`` is a PIL image or an HxWx3 / 3xHxW array (uint8, or float in 0..1). Colours are names from
    ``COLOURS``; see ``foreground_mask`` for how they are found. The shape comes from the fill ratio of the
    foreground mask inside its bounding box: an ideal square fills 1.0 of it, a circle pi/4 = 0.785, the upright
    triangle 0.5; the ratio is split at 0.65 and 0.90. Foreground and shape are ``None`` when the image has a
    single colour or the object is tiny (under 16 pixels).
    """
    mask, bg, fg = foreground_mask(image)
    area = int(mask.sum())
    if fg is None or area < 16:
        return bg, fg, None
    ys, xs = np.nonzero(mask)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = area / box
    if fill >= _CIRCLE_SQUARE_SPLIT:
        shape = "square"
    elif fill >= _TRIANGLE_CIRCLE_SPLIT:
        shape = "circle"
    else:
        shape = "triangle"
    return bg, fg, shape


# ----------------------------------------------------------------------------------------------------------------
# the demo concept: a colour the world lacks

def demo_caption(shape: str, background: str) -> str:
    """The demo concept's caption: the trigger word stands where a colour word goes."""
    return f"a {DEMO_TRIGGER} {shape} on a {background} background"


def render_demo(background: str, shape: str, size: int, x: int, y: int) -> Image.Image:
    """One 64x64 image of a ``shape`` in the demo colour on a world-colour background."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), PALETTE[background])
    draw_shape(ImageDraw.Draw(img), shape, x, y, size, DEMO_RGB)
    return img


#: The world's palette plus the demo colour (last), for the concept and drift metrics.
_EXTENDED_ARR = np.array([*_PALETTE_ARR, DEMO_RGB], dtype=np.float32)


def _extended_colour_map(image) -> np.ndarray:
    return _nearest_index(image, _EXTENDED_ARR)


def colour_shares(image) -> np.ndarray:
    """Share of the pixels nearest to each palette colour and, last, to the demo colour (sums to 1)."""
    idx = _extended_colour_map(image)
    return np.bincount(idx.ravel(), minlength=len(_EXTENDED_ARR)) / idx.size


def concept_score(image) -> float:
    """Share of the object's pixels (those not of the border's most common colour) nearest to the demo colour.

    Real demo images score 1.0 and world images 0.0; 0.0 too when fewer than 16 pixels differ from the
    background, so an empty picture does not count as the concept.
    """
    idx = _extended_colour_map(image)
    border = np.concatenate([idx[0, :], idx[-1, :], idx[:, 0], idx[:, -1]])
    obj = idx != np.bincount(border).argmax()
    if obj.sum() < 16:
        return 0.0
    return float((idx[obj] == len(_EXTENDED_ARR) - 1).mean())


def colour_drift(a, b) -> float:
    """How much two images' colour make-up differs: the total-variation distance between their
    ``colour_shares``, in [0, 1]. Insensitive to a shape's outline moving a little (which a tiny diffusion model
    does whenever its weights change at all), sensitive to colours changing or leaking (a white shape turning
    pink scores its area share).
    """
    return float(0.5 * np.abs(colour_shares(a) - colour_shares(b)).sum())
