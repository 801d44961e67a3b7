"""tinyworld: a procedural, seeded world of captioned 64x64 images.

Every image is one flat-coloured shape on a flat background of another colour, with the caption
``a {colour} {shape} on a {colour} background``. The world is the training data of the bundled tiny
Stable Diffusion base model (``trainer/assets/tiny-sd``) and the yardstick of its quality tests.

The module also holds:

* ``classify(image)``: a simple pixel-statistics classifier that reads (background, foreground, shape)
  back from an image. It scores 100% on real world images (see ``tests/test_tinyworld.py``).
* ``concept_score(image)``: how much the foreground looks like a five-pointed star, the shape of the
  demo concept (``examples/demo-concept``) that the base model was never shown.

Only the standard library, numpy and PIL are used (torch is not even needed); importing this module does
not import diffusers.
"""

from __future__ import annotations

import math
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
    "DEMO_SHAPE",
    "DEMO_TRIGGER",
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
    "shape_ious",
    "concept_score",
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

#: The demo concept (``examples/demo-concept``): a shape the base world never contains.
DEMO_SHAPE = "star"
DEMO_TRIGGER = "zqx"

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

def _star_points(x0: float, y0: float, size: float, inner_ratio: float = 0.45) -> list[tuple[float, float]]:
    """Vertices of an upright five-pointed star whose bounding box has top-left (x0, y0) and width ``size``."""
    # Unit star centred at 0 with outer radius 1, top point up. Its bounding box is not square: compute it.
    pts = []
    for k in range(10):
        r = 1.0 if k % 2 == 0 else inner_ratio
        a = -math.pi / 2 + k * math.pi / 5
        pts.append((r * math.cos(a), r * math.sin(a)))
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    minx, maxx, miny, maxy = min(xs), max(xs), min(ys), max(ys)
    scale = (size - 1) / (maxx - minx)
    h = (maxy - miny) * scale
    off_y = y0 + ((size - 1) - h) / 2  # centre the (slightly flatter) star vertically in its square box
    return [(x0 + (px - minx) * scale, off_y + (py - miny) * scale) for px, py in pts]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, x: int, y: int, size: int, fill) -> None:
    """Draw ``shape`` with its ``size`` x ``size`` bounding box at top-left (x, y). No anti-aliasing."""
    x1, y1 = x + size - 1, y + size - 1
    if shape == "circle":
        draw.ellipse([x, y, x1, y1], fill=fill)
    elif shape == "square":
        draw.rectangle([x, y, x1, y1], fill=fill)
    elif shape == "triangle":  # upright isosceles, base = height = size
        draw.polygon([(x + (size - 1) / 2, y), (x1, y1), (x, y1)], fill=fill)
    elif shape == "star":
        draw.polygon(_star_points(x, y, size), fill=fill)
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


def nearest_colour_map(image) -> np.ndarray:
    """HxW int array: index into ``COLOURS`` of the nearest palette colour (RGB distance) of each pixel."""
    arr = _to_array(image)
    d = ((arr[:, :, None, :] - _PALETTE_ARR[None, None]) ** 2).sum(-1)
    return d.argmin(-1)


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
# concept metric of the demo shape

def _ideal_mask(shape: str, box: tuple[int, int, int, int]) -> np.ndarray:
    """Mask of the ideal ``shape`` fitted to the bounding box ``(y0, x0, y1, x1)`` (inclusive)."""
    y0, x0, y1, x1 = box
    h, w = y1 - y0 + 1, x1 - x0 + 1
    size = max(h, w)
    img = Image.new("L", (IMAGE_SIZE + 2 * size, IMAGE_SIZE + 2 * size), 0)
    draw = ImageDraw.Draw(img)
    # draw a size x size shape and then squeeze it into the w x h box
    tmp = Image.new("L", (size, size), 0)
    draw_shape(ImageDraw.Draw(tmp), shape, 0, 0, size, 255)
    if shape == "star":  # the star is flatter than its square box: crop to its own extent before fitting
        bb = tmp.getbbox()
        if bb:
            tmp = tmp.crop(bb)
    tmp = tmp.resize((w, h), Image.NEAREST)
    img.paste(tmp, (x0 + size, y0 + size))
    del draw
    arr = np.asarray(img) > 127
    return arr[size:size + IMAGE_SIZE, size:size + IMAGE_SIZE]


def shape_ious(image) -> dict[str, float]:
    """IoU of the foreground mask against each ideal shape (circle, square, triangle, star) fitted to the
    mask's bounding box. All zeros when there is no foreground."""
    mask, _, fg = foreground_mask(image)
    out = {s: 0.0 for s in (*SHAPES, DEMO_SHAPE)}
    if fg is None or mask.sum() < 16:
        return out
    ys, xs = np.nonzero(mask)
    box = (int(ys.min()), int(xs.min()), int(ys.max()), int(xs.max()))
    for s in out:
        ideal = _ideal_mask(s, box)
        inter = np.logical_and(mask, ideal).sum()
        union = np.logical_or(mask, ideal).sum()
        out[s] = float(inter / union) if union else 0.0
    return out


def concept_score(image) -> float:
    """How much the image's foreground object looks like the demo concept's five-pointed star, in [0, 1].

    It is the IoU between the foreground mask (see ``foreground_mask``) and an ideal upright star fitted to the
    mask's bounding box. Real demo images score about 0.95+; base-world circles, squares and triangles score
    about 0.35-0.55 (measured numbers are in ``trainer/assets/tiny-sd/README.md`` and ``tests/test_tinyworld.py``).
    """
    return shape_ious(image)[DEMO_SHAPE]
