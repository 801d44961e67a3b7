"""Issue 3 end to end: the tiny-demo preset teaches the built-in model the demo concept, and only that.

Concept metric: the share of images that are clean stars, i.e. whose `tinyworld.concept_score` (IoU of the
foreground mask against an ideal star fitted to its bounding box) is at least STAR_IOU. Real demo stars score 0.92
to 1.0 and real circles/squares/triangles at most 0.60, but ragged noise textures score 0.72 to 0.76 (measured),
so the mean IoU alone is fooled by a broken image; a threshold is not. Drift metric: mean absolute pixel difference (0-1 scale) between images generated with the adapter
at weight 1 and at weight 0 (the base model), same prompts and seeds, for prompts without the trigger word.
"""
import time
from pathlib import Path

import numpy as np
import pytest

from trainer import config as C
from trainer import runs
from trainer.assets import TINY_SD_PATH, tiny_model_available
from trainer.loop import Trainer
from trainer.tinyworld import concept_score

ROOT = Path(__file__).resolve().parent.parent
SEEDS = list(range(8))
TRIGGER_PROMPT = "zqx, a red star on a blue background"
PLAIN_PROMPTS = ["a red circle on a blue background", "a yellow square on a black background",
                 "a white triangle on a green background"]
STAR_IOU = 0.85
DRIFT_BOUND = 0.12  # mean |pixel difference| on a 0-1 scale (measured 0.06 to 0.09)
STAR_RATE_GAIN = 0.25  # share of clean stars with the adapter minus without

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not tiny_model_available(), reason=f"tiny base model not built at {TINY_SD_PATH}")]


@pytest.fixture(scope="module")
def demo_adapter(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.chdir(ROOT)  # the preset names examples/demo-concept relative to the repository
    cfg = C.load(ROOT / "presets" / "tiny-demo.toml",
                 [f"saving.runs_dir={tmp_path_factory.mktemp('runs')}", "sampling.every_n_steps=0"])
    C.check(cfg)
    started = time.time()
    path = Trainer(cfg, runs.create_run_dir(cfg)).run()
    seconds = time.time() - started
    print(f"tiny-demo training took {seconds:.1f} s")
    assert seconds < 240, "the demo trains in under two minutes on this machine (measured 51 s); 240 s is slack"
    return path


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def images(generator, prompt, weight):
    generator.set_adapters([(generator.demo_path, weight, True)])
    return [np.asarray(generator.generate(prompt, seed=s, steps=20, guidance=4.0, width=64, height=64)[0],
                       dtype=np.float32) / 255 for s in SEEDS]


@pytest.mark.xfail(strict=True, reason="known gap (issue 3): with this preset the adapter turns the trigger prompt "
                   "into textured noise, not stars; the shipped base model cannot parse a prompt with a prefix (its "
                   "text encoder saw only fixed-position captions) and a 400-step LoRA does not fix that yet")
def test_demo_concept_is_learned_and_other_prompts_barely_drift(demo_adapter):
    from trainer.adapters.generate import Generator
    generator = Generator("")
    generator.demo_path = demo_adapter
    base = [concept_score(im) for im in images(generator, TRIGGER_PROMPT, 0.0)]
    tuned = [concept_score(im) for im in images(generator, TRIGGER_PROMPT, 1.0)]
    drifts = []
    for prompt in PLAIN_PROMPTS:
        before, after = images(generator, prompt, 0.0), images(generator, prompt, 1.0)
        drifts.append(float(np.mean([np.abs(a - b).mean() for a, b in zip(before, after)])))
    rate = {name: float(np.mean([x >= STAR_IOU for x in scores])) for name, scores in (("base", base),
                                                                                        ("tuned", tuned))}
    print(f"mean star IoU base {np.mean(base):.3f} -> with adapter {np.mean(tuned):.3f}; clean stars "
          f"{rate['base']:.0%} -> {rate['tuned']:.0%}")
    print("drift without trigger: " + ", ".join(f"{p!r}: {d:.3f}" for p, d in zip(PLAIN_PROMPTS, drifts)))
    assert rate["tuned"] >= rate["base"] + STAR_RATE_GAIN
    assert max(drifts) < DRIFT_BOUND
