#!/usr/bin/env python
"""Write the demo concept dataset: ``examples/demo-concept/`` (12 images, 64x64 png + same-name .txt captions),
and its regularization set ``examples/demo-regularization/`` (12 images drawn by the base model).

The concept is a colour the tiny base model never saw, hot pink (``tinyworld.DEMO_RGB``), named by the rare
word ``zqx`` where a colour word goes: ``a zqx circle on a blue background``. ``trainer.tinyworld.concept_score``
measures how much of a generated object has that colour, so tests can show that a LoRA trained on this folder
learnt the concept.

The regularization images are DreamBooth's class images: the first four world colours (red, green, blue,
yellow) on every shape (12 prompts such as ``a green circle on a blue background``), drawn by the base model
itself (30 steps, guidance 4, seed = the image's index). All eight colours (24 images, each drawn once an epoch)
held the prior worse: ``a yellow square on a black background`` drifted 0.11 to 0.16 against 0.06 with these 12
(measured on the 6000-step base model). Trained beside the concept (``dataset.regularization_path``), they hold
prompts without the trigger to what the base model drew; they depend on the base model, so rebuild them with it.

    python tools/make_demo_dataset.py [--out examples/demo-concept] [--n 12] [--seed 7]
                                      [--reg-out examples/demo-regularization] [--model ""] [--reg-colours 4]
                                      [--no-regularization]
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer import set_dataset_trigger  # noqa: E402
from trainer import tinyworld as tw  # noqa: E402


def _empty_folder(out: Path) -> None:
    """Create `out`, or remove the images and captions a previous run wrote there."""
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("*.png")) + list(out.glob("*.txt")):
        old.unlink()


def make(out: Path, n: int = 12, seed: int = 7) -> list[Path]:
    _empty_folder(out)
    rng = random.Random(seed)
    # every shape equally often and every background colour at least once
    shapes = list(tw.SHAPES) * (n // len(tw.SHAPES) + 1)
    backgrounds = list(tw.COLOURS) * (n // len(tw.COLOURS) + 1)
    rng.shuffle(shapes)
    rng.shuffle(backgrounds)
    paths = []
    for i in range(n):
        shape, bg = shapes[i], backgrounds[i]
        # the world's own size range: concept images of only large objects (26..44 px) taught the LoRA to
        # draw every object larger (a red circle drifted 0.09 to 0.12)
        size = rng.randint(tw.MIN_SIZE, tw.MAX_SIZE)
        x, y = rng.randint(0, 64 - size), rng.randint(0, 64 - size)
        p = out / f"zqx_{i:02d}.png"
        tw.render_demo(bg, shape, size, x, y).save(p)
        p.with_suffix(".txt").write_text(tw.demo_caption(shape, bg) + "\n", encoding="utf-8")
        paths.append(p)
    set_dataset_trigger(out, tw.DEMO_TRIGGER)  # the dataset's own trigger, as the app's Dataset tab saves it
    return paths


def class_prompts(rng: random.Random, colours=tw.COLOURS) -> list[str]:
    """Each of `colours` on every shape once, each on a background of another colour drawn from shuffled rounds of
    all eight. The demo test's drift prompts (``tinyworld.DRIFT_PROMPTS``) are never drawn, so that test measures
    held-out prompts."""
    pool: list[str] = []
    prompts = []
    for colour in colours:
        for shape in tw.SHAPES:
            def allowed(bg: str) -> bool:
                return bg != colour and tw.caption_for(bg, colour, shape) not in tw.DRIFT_PROMPTS
            if not any(allowed(c) for c in pool):
                pool += rng.sample(tw.COLOURS, len(tw.COLOURS))
            background = next(c for c in pool if allowed(c))
            pool.remove(background)
            prompts.append(tw.caption_for(background, colour, shape))
    return prompts


def make_regularization(out: Path, model: str = "", seed: int = 7, colours: int = 4) -> list[Path]:
    from trainer.adapters.generate import Generator

    _empty_folder(out)
    generator = Generator(model, device="cpu")
    paths = []
    for i, prompt in enumerate(class_prompts(random.Random(seed + 1), tw.COLOURS[:colours])):
        [image] = generator.generate(prompt, seed=i, steps=30, guidance=4.0, width=tw.IMAGE_SIZE,
                                     height=tw.IMAGE_SIZE)
        p = out / f"reg_{i:02d}.png"
        image.save(p)
        p.with_suffix(".txt").write_text(prompt + "\n", encoding="utf-8")
        paths.append(p)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "examples" / "demo-concept")
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--reg-out", type=Path, default=ROOT / "examples" / "demo-regularization")
    ap.add_argument("--model", default="", help="base model that draws the regularization images ('' = tiny-sd)")
    ap.add_argument("--reg-colours", type=int, default=4, help="world colours in the regularization set (1..8)")
    ap.add_argument("--no-regularization", action="store_true", help="write the concept images only")
    a = ap.parse_args(argv)
    if not 8 <= a.n <= 16:
        ap.error("--n must be 8..16")
    paths = make(a.out, a.n, a.seed)
    print(f"wrote {len(paths)} images to {a.out}")
    if not a.no_regularization:
        reg = make_regularization(a.reg_out, a.model, a.seed, a.reg_colours)
        print(f"wrote {len(reg)} regularization images to {a.reg_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
