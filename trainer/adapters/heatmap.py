"""A heatmap PNG with axis labels and a colour bar, drawn with PIL (matplotlib would be a heavy dependency for one
chart)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from trainer.atomic import save_image_atomic

# viridis at 0, 0.25, 0.5, 0.75, 1: perceptually even and readable in grey scale
_ANCHORS = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], dtype=np.float64)
_LEFT, _TOP, _BOTTOM, _RIGHT = 64, 36, 48, 84


def colour_map(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB by linear interpolation between the viridis anchors."""
    x = np.clip(values, 0.0, 1.0) * (len(_ANCHORS) - 1)
    lo = np.minimum(np.floor(x).astype(int), len(_ANCHORS) - 2)
    t = (x - lo)[..., None]
    return (_ANCHORS[lo] * (1 - t) + _ANCHORS[lo + 1] * t).round().astype(np.uint8)


def save_heatmap(matrix: torch.Tensor, path: str | Path, title: str = "", row_label: str = "i",
                 col_label: str = "j") -> Path:
    """Draw `matrix` (values in [0, 1]; row 1 at the top, like the paper's Figure 3) and save it atomically."""
    values = matrix.detach().double().cpu().numpy()
    rows, cols = values.shape
    cell_w, cell_h = (max(3, min(28, 360 // n)) for n in (cols, rows))
    width, height = _LEFT + cols * cell_w + _RIGHT, _TOP + rows * cell_h + _BOTTOM
    image = Image.new("RGB", (max(width, 6 * len(col_label) + _LEFT), height), "white")
    cells = np.repeat(np.repeat(colour_map(values), cell_h, axis=0), cell_w, axis=1)
    image.paste(Image.fromarray(cells), (_LEFT, _TOP))
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    draw.text((4, 6), title[-(image.width // 6):], fill="black", font=font)
    for k in range(0, rows, max(1, math.ceil(14 / cell_h))):
        draw.text((_LEFT - 24, _TOP + k * cell_h + cell_h // 2 - 5), f"{k + 1:>3}", fill="black", font=font)
    for k in range(0, cols, max(1, math.ceil(24 / cell_w))):
        draw.text((_LEFT + k * cell_w + cell_w // 2 - 4, height - _BOTTOM + 4), f"{k + 1}", fill="black", font=font)
    draw.text((_LEFT, height - 16), col_label, fill="black", font=font)
    _vertical_text(image, row_label, (4, _TOP), rows * cell_h, font)
    _colour_bar(image, draw, font, _LEFT + cols * cell_w + 16, rows * cell_h)
    return save_image_atomic(image, path)


def _vertical_text(image: Image.Image, text: str, at: tuple[int, int], span: int, font) -> None:
    """Text rotated a quarter turn (reading upwards), centred along `span` pixels from `at`."""
    label = Image.new("RGB", (6 * len(text) + 4, 12), "white")
    ImageDraw.Draw(label).text((2, 0), text, fill="black", font=font)
    label = label.rotate(90, expand=True)
    image.paste(label, (at[0], at[1] + max(0, (span - label.height) // 2)))


def _colour_bar(image: Image.Image, draw: ImageDraw.ImageDraw, font, x: int, height: int) -> None:
    height = max(height, 60)
    ramp = colour_map(np.linspace(1.0, 0.0, height))[:, None, :].repeat(14, axis=1)
    image.paste(Image.fromarray(ramp), (x, _TOP))
    draw.rectangle([x - 1, _TOP - 1, x + 14, _TOP + height], outline="black")  # around the ramp, not on it
    for value in (1.0, 0.5, 0.0):
        y = _TOP + round((1 - value) * (height - 1))
        draw.line([x + 15, y, x + 18, y], fill="black")
        draw.text((x + 21, y - 5), f"{value:.1f}", fill="black", font=font)
