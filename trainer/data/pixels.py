"""Pixels for one training sample: resize to cover the bucket, crop, flip, scale to [-1, 1]."""
from __future__ import annotations

import random

from PIL import Image

from .images import load_image

CROPS = ("center", "random")


def needs_fresh_pixels(ds) -> bool:
    """True when a random augmentation (random crop or flip) makes each step's pixels differ, so latents of a
    fixed transform cannot be cached."""
    return ds.crop == "random" or bool(ds.flip)


def cover_size(source: tuple[int, int], size: tuple[int, int]) -> tuple[int, int]:
    """The smallest aspect-preserving size of `source` that covers `size` (w, h)."""
    (w, h), (target_w, target_h) = source, size
    scale = max(target_w / w, target_h / h)
    return max(target_w, round(w * scale)), max(target_h, round(h * scale))


def crop_box(covered: tuple[int, int], size: tuple[int, int], crop: str, rng: random.Random):
    """(left, top, right, bottom) of a `size` crop in an image of size `covered`; 'random' draws from rng."""
    (w, h), (target_w, target_h) = covered, size
    if crop == "random":
        left, top = rng.randint(0, w - target_w), rng.randint(0, h - target_h)
    elif crop == "center":
        left, top = (w - target_w) // 2, (h - target_h) // 2
    else:
        raise ValueError(f"crop must be one of {', '.join(CROPS)}, got {crop!r}")
    return left, top, left + target_w, top + target_h


def load_pixels(item, size: tuple[int, int], crop: str, flip: bool, rng: random.Random):
    """FloatTensor [3, h, w] in [-1, 1] of `item` at `size` = (w, h)."""
    import numpy as np
    import torch

    img = load_image(item.path)
    covered = cover_size(img.size, size)
    if covered != img.size:
        img = img.resize(covered, Image.Resampling.LANCZOS, reducing_gap=3.0)
    img = img.crop(crop_box(covered, size, crop, rng))
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.array(img, dtype=np.uint8))
    return pixels.permute(2, 0, 1).float().div_(127.5).sub_(1.0).contiguous()
