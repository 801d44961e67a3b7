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
    assert tw.parse_caption(tw.demo_caption("circle", "blue")) == ("blue", "zqx", "circle")
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


def test_concept_score_and_colour_drift():
    world = tw.generate_samples(150, seed=6)
    demo = [tw.render_demo(s.background, s.shape, 30, 10, 12) for s in world[:30]]
    assert [tw.concept_score(s.image) for s in world] == [0.0] * 150
    assert [tw.concept_score(im) for im in demo] == [1.0] * 30
    assert tw.concept_score(tw.render_demo("blue", "square", 4, 5, 5)) == 1.0  # 16 object pixels: counted
    assert tw.concept_score(tw.render_demo("blue", "square", 3, 5, 5)) == 0.0  # 9: too few to call an object
    red, pink = tw.render("blue", "red", "square", 32, 0, 0), tw.render_demo("blue", "square", 32, 0, 0)
    moved = tw.render("blue", "red", "square", 32, 20, 20)
    assert tw.colour_drift(red, red) == 0.0
    assert tw.colour_drift(red, moved) == 0.0  # the same colours in the same amounts
    assert tw.colour_drift(red, pink) == pytest.approx(32 * 32 / 64 ** 2)  # the object's area changed colour
    assert tw.colour_drift(red, tw.render("green", "white", "square", 32, 0, 0)) == 1.0


def test_demo_dataset_is_the_new_colour_in_world_captions():
    pngs = sorted(DEMO.glob("*.png"))
    assert 8 <= len(pngs) <= 16, "examples/demo-concept: regenerate with python tools/make_demo_dataset.py"
    from PIL import Image

    for p in pngs:
        cap = p.with_suffix(".txt").read_text(encoding="utf-8").strip()
        bg, colour, shape = tw.parse_caption(cap)
        assert colour == tw.DEMO_TRIGGER and shape in tw.SHAPES and bg in tw.COLOURS
        img = Image.open(p)
        assert img.size == (64, 64)
        assert tw.classify(img)[0] == bg
        assert tw.concept_score(img) == 1.0
