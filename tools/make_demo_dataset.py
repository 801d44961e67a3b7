#!/usr/bin/env python
"""Write the demo concept dataset: ``examples/demo-concept/`` (12 images, 64x64 png + same-name .txt captions).

The concept is a colour the tiny base model never saw, hot pink (``tinyworld.DEMO_RGB``), named by the rare
word ``zqx`` where a colour word goes: ``a zqx circle on a blue background``. ``trainer.tinyworld.concept_score``
measures how much of a generated object has that colour, so tests can show that a LoRA trained on this folder
learnt the concept.

    python tools/make_demo_dataset.py [--out examples/demo-concept] [--n 12] [--seed 7]
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer import tinyworld as tw  # noqa: E402


def make(out: Path, n: int = 12, seed: int = 7) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("*.png")) + list(out.glob("*.txt")):
        old.unlink()
    rng = random.Random(seed)
    # every shape equally often and every background colour at least once
    shapes = list(tw.SHAPES) * (n // len(tw.SHAPES) + 1)
    backgrounds = list(tw.COLOURS) * (n // len(tw.COLOURS) + 1)
    rng.shuffle(shapes)
    rng.shuffle(backgrounds)
    paths = []
    for i in range(n):
        shape, bg = shapes[i], backgrounds[i]
        size = rng.randint(26, tw.MAX_SIZE)
        x, y = rng.randint(0, 64 - size), rng.randint(0, 64 - size)
        p = out / f"zqx_{i:02d}.png"
        tw.render_demo(bg, shape, size, x, y).save(p)
        p.with_suffix(".txt").write_text(tw.demo_caption(shape, bg) + "\n", encoding="utf-8")
        paths.append(p)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "examples" / "demo-concept")
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args(argv)
    if not 8 <= a.n <= 16:
        ap.error("--n must be 8..16")
    paths = make(a.out, a.n, a.seed)
    print(f"wrote {len(paths)} images to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
