"""Issue 3 end to end: the tiny-demo preset teaches the built-in model the demo concept, and barely anything else.

The concept is `zqx`, a colour the base world never contains (hot pink), used where a colour word goes.

Concept metric: `tinyworld.concept_score`, the share of an image's object pixels (those not of the border's
colour) whose nearest colour, among the world's eight and the demo colour, is the demo colour. Real demo
images score 1.0, world images 0.0, an empty picture 0.0.

Drift metric: for three prompts without the trigger, images with the adapter at weight 1 against weight 0 (the
base model), same seeds: `tinyworld.colour_drift`, the total-variation distance between the two images' colour
make-up (0 = the same colours in the same amounts, 1 = nothing in common). The mean absolute pixel difference is
printed too; both are compared with the same measure between two seeds of the base model (printed), which is
what "a different picture" looks like.
"""
import time
from pathlib import Path

import numpy as np
import pytest

from trainer import config as C
from trainer import runs
from trainer.assets import TINY_SD_PATH, tiny_model_available
from trainer.loop import Trainer
from trainer.tinyworld import DRIFT_PROMPTS, colour_drift, concept_score

ROOT = Path(__file__).resolve().parent.parent
SEEDS = list(range(8))
TRIGGER_PROMPT = "a zqx circle on a blue background"
PLAIN_PROMPTS = list(DRIFT_PROMPTS)  # held out of examples/demo-regularization
CONCEPT_GAIN = 0.25  # mean concept score with the adapter minus without (measured 0.004 -> 0.530)
CONCEPT_HIT = 0.3    # an image "shows the concept" when at least this share of its object is the new colour
DRIFT_BOUND = 0.12   # colour drift per prompt, mean over seeds (measured 0.045 to 0.083)

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
    # printed, never asserted: other work shares these cores (a busy host once took 586 s); the time is measured
    # side by side in bench/ and quoted in the closing notes
    print(f"tiny-demo training took {time.time() - started:.1f} s")
    return path


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def images(generator, prompt, weight, seeds=SEEDS):
    generator.set_adapters([(generator.demo_path, weight, True)])
    return [generator.generate(prompt, seed=s, steps=20, guidance=4.0, width=64, height=64)[0] for s in seeds]


def pixel_drift(before, after) -> float:
    return float(np.mean([np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean() / 255
                          for a, b in zip(before, after)]))


def test_demo_concept_is_learned_and_other_prompts_barely_drift(demo_adapter):
    from trainer.adapters.generate import Generator
    generator = Generator("")
    generator.demo_path = demo_adapter
    base = [concept_score(im) for im in images(generator, TRIGGER_PROMPT, 0.0)]
    tuned = [concept_score(im) for im in images(generator, TRIGGER_PROMPT, 1.0)]
    hits = {name: float(np.mean([x >= CONCEPT_HIT for x in s])) for name, s in (("base", base), ("tuned", tuned))}
    print(f"concept score for {TRIGGER_PROMPT!r}: base {np.mean(base):.3f} -> with adapter {np.mean(tuned):.3f} "
          f"(per seed {[round(x, 2) for x in tuned]}); images showing the concept {hits['base']:.0%} -> "
          f"{hits['tuned']:.0%}")
    drifts = {}
    for prompt in PLAIN_PROMPTS:
        before, after = images(generator, prompt, 0.0), images(generator, prompt, 1.0)
        other_seeds = images(generator, prompt, 0.0, [s + 100 for s in SEEDS])
        drifts[prompt] = (float(np.mean([colour_drift(a, b) for a, b in zip(before, after)])),
                          float(np.mean([colour_drift(a, b) for a, b in zip(before, other_seeds)])),
                          pixel_drift(before, after), pixel_drift(before, other_seeds))
        print(f"{prompt!r}: colour drift {drifts[prompt][0]:.3f} (another seed: {drifts[prompt][1]:.3f}), "
              f"pixel drift {drifts[prompt][2]:.3f} (another seed: {drifts[prompt][3]:.3f})")
    assert np.mean(tuned) >= np.mean(base) + CONCEPT_GAIN
    assert hits["tuned"] >= hits["base"] + 0.5
    assert max(d[0] for d in drifts.values()) < DRIFT_BOUND
