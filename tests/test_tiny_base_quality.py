"""Quality of the bundled tiny base model (trainer/assets/tiny-sd), judged by tinyworld's classifier.

48 prompts of the world's form, fixed seeds, the plain diffusers StableDiffusionPipeline (30 steps, guidance 4,
64x64). The prompts and seeds are the ones ``tools/build_tiny_base.py`` evaluates with, so the numbers printed
here are the numbers in the model card.
"""


import numpy as np
import pytest

from trainer import tinyworld as tw
from trainer.assets import TINY_SD_PATH, tiny_model_available

PROMPT_SEED = tw.QUALITY_PROMPT_SEED
N_PROMPTS = tw.QUALITY_PROMPTS
MIN_BG, MIN_FG, MIN_SHAPE = 0.80, 0.70, 0.60


def test_classifier_is_exact_on_real_world_images():
    samples = tw.generate_samples(300, seed=99)
    assert all(tw.classify(s.image) == (s.background, s.foreground, s.shape) for s in samples)


@pytest.mark.slow
def test_tiny_base_draws_what_it_is_told():
    if not tiny_model_available():
        pytest.skip(f"tiny base model folder absent: {TINY_SD_PATH} (build it: python tools/build_tiny_base.py)")
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(TINY_SD_PATH))
    pipe.set_progress_bar_config(disable=True)
    items = tw.quality_prompts(N_PROMPTS, PROMPT_SEED)
    hits = np.zeros(3)
    for start in range(0, len(items), 24):
        part = items[start:start + 24]
        gens = [torch.Generator().manual_seed(s) for _, _, s in part]
        images = pipe([p for p, _, _ in part], num_inference_steps=30, guidance_scale=4.0, height=64, width=64,
                      generator=gens).images
        for (_, want, _), img in zip(part, images):
            got = tw.classify(img)
            hits += [got[0] == want[0], got[1] == want[1], got[2] == want[2]]
    bg, fg, shape = hits / len(items)
    print(f"\ntiny-sd quality on {len(items)} prompts: background {bg:.1%}, foreground {fg:.1%}, shape {shape:.1%}")
    assert bg >= MIN_BG, f"background colour right in {bg:.1%} < {MIN_BG:.0%}"
    assert fg >= MIN_FG, f"foreground colour right in {fg:.1%} < {MIN_FG:.0%}"
    assert shape >= MIN_SHAPE, f"shape right in {shape:.1%} < {MIN_SHAPE:.0%}"
