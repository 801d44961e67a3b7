"""The procedural world behind the tiny base model, its classifier and the demo-concept metric."""

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trainer import tinyworld as tw

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "demo-concept"


def test_import_does_not_pull_diffusers():
    code = "import sys, trainer.tinyworld; assert 'diffusers' not in sys.modules; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_generator_is_seeded_and_well_formed():
    a = tw.generate_samples(20, seed=7)
    b = tw.generate_samples(20, seed=7)
    c = tw.generate_samples(20, seed=8)
    assert [s.caption for s in a] == [s.caption for s in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    assert [s.caption for s in a] != [s.caption for s in c]
    for s in a:
        assert s.image.size == (64, 64) and s.image.mode == "RGB"
        assert s.background != s.foreground
        assert s.caption == f"a {s.foreground} {s.shape} on a {s.background} background"
        assert tw.parse_caption(s.caption) == (s.background, s.foreground, s.shape)


def test_parse_caption():
    assert tw.parse_caption("zqx, a red star on a blue background") == ("blue", "red", "star")
    assert tw.parse_caption("A Green Circle on a white background") == ("white", "green", "circle")
    with pytest.raises(ValueError):
        tw.parse_caption("a photo of a cat")


def test_classifier_is_exact_on_real_images():
    samples = tw.generate_samples(400, seed=123)
    wrong = [s.caption for s in samples if tw.classify(s.image) != (s.background, s.foreground, s.shape)]
    assert not wrong, wrong[:5]
    # all sizes, shapes and colour pairs at the extremes
    rng = random.Random(0)
    for shape in tw.SHAPES:
        for size in (tw.MIN_SIZE, tw.MIN_SIZE + 1, tw.MAX_SIZE):
            fg, bg = rng.sample(tw.COLOURS, 2)
            img = tw.render(bg, fg, shape, size, rng.randint(0, 64 - size), rng.randint(0, 64 - size))
            assert tw.classify(img) == (bg, fg, shape)


def test_classifier_accepts_arrays():
    s = tw.generate_samples(1, seed=3)[0]
    arr = np.asarray(s.image)
    want = (s.background, s.foreground, s.shape)
    assert tw.classify(arr) == want
    assert tw.classify(arr.astype(np.float32) / 255.0) == want
    assert tw.classify(arr.transpose(2, 0, 1)) == want


def test_concept_score_separates_stars_from_world_shapes():
    stars = tw.generate_samples(100, seed=5, shapes=[tw.DEMO_SHAPE], trigger=tw.DEMO_TRIGGER)
    world = tw.generate_samples(150, seed=6)
    star_scores = [tw.concept_score(s.image) for s in stars]
    world_scores = [tw.concept_score(s.image) for s in world]
    assert min(star_scores) > 0.85
    assert max(world_scores) < 0.65
    assert stars[0].caption.startswith("zqx, a ")


def test_demo_dataset_is_real_stars():
    pngs = sorted(DEMO.glob("*.png"))
    if not pngs:
        pytest.skip("examples/demo-concept not generated (python tools/make_demo_dataset.py)")
    assert 8 <= len(pngs) <= 16
    from PIL import Image

    for p in pngs:
        cap = p.with_suffix(".txt").read_text(encoding="utf-8").strip()
        assert cap.startswith(tw.DEMO_TRIGGER + ", ")
        bg, fg, shape = tw.parse_caption(cap)
        assert shape == tw.DEMO_SHAPE
        img = Image.open(p)
        assert img.size == (64, 64)
        got_bg, got_fg, _ = tw.classify(img)
        assert (got_bg, got_fg) == (bg, fg)
        assert tw.concept_score(img) > 0.85
