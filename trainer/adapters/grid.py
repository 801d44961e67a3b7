"""A labelled image grid (rows x columns of equal-size images) drawn with PIL."""
from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

_CHAR_W, _HEADER = 6, 18  # PIL's default bitmap font is about 6 px per character


def image_grid(rows: list[list[Image.Image]], row_labels: list[str], col_labels: list[str]) -> Image.Image:
    """rows[r][c] at row r, column c; row labels on the left, column labels on top."""
    if not rows or not rows[0]:
        raise ValueError("image_grid needs at least one image")
    w, h = rows[0][0].size
    left = 8 + _CHAR_W * max(len(label) for label in row_labels)
    grid = Image.new("RGB", (left + w * len(rows[0]), _HEADER + h * len(rows)), "white")
    draw, font = ImageDraw.Draw(grid), ImageFont.load_default()
    for c, label in enumerate(col_labels):
        draw.text((left + c * w + 2, 3), label[: max(1, w // _CHAR_W)], fill="black", font=font)
    for r, (images, label) in enumerate(zip(rows, row_labels)):
        draw.text((4, _HEADER + r * h + h // 2 - 5), label, fill="black", font=font)
        for c, image in enumerate(images):
            grid.paste(image.convert("RGB").resize((w, h)), (left + c * w, _HEADER + r * h))
    return grid
