#!/usr/bin/env python
"""Write the demo concept dataset: ``examples/demo-concept/`` (12 images, 64x64 png + same-name .txt captions).

The concept is a shape the tiny base model never saw, a five-pointed ``star``, named by the rare trigger word
``zqx``: captions read ``zqx, a red star on a blue background``. ``trainer.tinyworld.concept_score`` measures how
star-like a generated image is, so tests can show that a LoRA trained on this folder learnt the concept.

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
    paths = []
    # large stars (the concept is easier to see and to learn) with every colour used as foreground at least once
    fgs = list(tw.COLOURS) * (n // len(tw.COLOURS) + 1)
    rng.shuffle(fgs)
    for i in range(n):
        fg = fgs[i]
        bg = rng.choice([c for c in tw.COLOURS if c != fg])
        size = rng.randint(32, tw.MAX_SIZE)
        x, y = rng.randint(0, 64 - size), rng.randint(0, 64 - size)
        img = tw.render(bg, fg, tw.DEMO_SHAPE, size, x, y)
        p = out / f"zqx_{i:02d}.png"
        img.save(p)
        p.with_suffix(".txt").write_text(tw.caption_for(bg, fg, tw.DEMO_SHAPE, tw.DEMO_TRIGGER) + "\n",
                                         encoding="utf-8")
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
