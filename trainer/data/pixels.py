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


def crop_geometry(item, size: tuple[int, int], crop: str, rng: random.Random):
    """Where a training sample of `item` comes from: the size its image is resized to (covering the bucket `size`,
    aspect kept) and the crop box in it. Known from the scan alone, so cached latents carry it too; SDXL's
    micro-conditioning is built from it (`size_info`). A random crop draws from rng."""
    covered = cover_size((item.width, item.height), size)
    return covered, crop_box(covered, size, crop, rng)


def size_info(item, size: tuple[int, int], box: tuple[int, int, int, int]):
    """The image's real original size, its crop offset in the resized image and the bucket size, as (h, w) pairs:
    what kohya's sd-scripts and OneTrainer give SDXL (some trainers pass zeros, which wastes the conditioning)."""
    from trainer.models.family import SizeInfo
    return SizeInfo(original_hw=(item.height, item.width), crop_top_left=(box[1], box[0]),
                    target_hw=(size[1], size[0]))


def load_pixels(item, size: tuple[int, int], crop: str, flip: bool, rng: random.Random, box=None):
    """FloatTensor [3, h, w] in [-1, 1] of `item` at `size` = (w, h); `box` is crop_geometry()'s, drawn here
    when not given."""
    import numpy as np
    import torch

    img = load_image(item.path)
    covered = cover_size(img.size, size)
    if covered != img.size:
        img = img.resize(covered, Image.Resampling.LANCZOS, reducing_gap=3.0)
    img = img.crop(box if box is not None else crop_box(covered, size, crop, rng))
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.array(img, dtype=np.uint8))
    return pixels.permute(2, 0, 1).float().div_(127.5).sub_(1.0).contiguous()
