"""dataset.free_text_encoders: every caption, sample prompt and the negative prompt encoded at the start, then the
text encoders deleted. A run with it trains the same adapter bit for bit and renders the same samples as one
without; the encoders are unreachable from the first step on; a resumed run works; validate refuses what it
cannot do. Samples rendered from prompt embeddings equal samples rendered from the prompts on each family."""
from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

from test_training import assert_same_tensors, make_cfg, tensors
from tiny import make_images
from trainer import config as C
from trainer import runs
from trainer.events import EventLog, Progress, SampleWritten
from trainer.loop import Trainer

CAPTIONS = ["a red square", "a green square, zqx", "a blue square", "a yellow square on white"]


def dataset(root, size: int = 32):
    """Four images with four captions (one holds the trigger) and two regularization images."""
    data = make_images(root / "data", n=4, size=size)
    for i, caption in enumerate(CAPTIONS):
        (data / f"img{i}.txt").write_text(caption, encoding="utf-8")
    reg = make_images(root / "reg", n=2, size=size, caption="a square")
    return data, reg


def config(model, root, free: bool, **overrides) -> C.TrainConfig:
    data, reg = dataset(root, size=48 if "model.t5_length" in overrides else 32)
    values = {"network.text_encoders": [], "schedule.max_steps": 4, "dataset.caption_dropout": 0.3,
              "dataset.regularization_path": str(reg), "validation.split": 0.25, "saving.every_n_steps": 2,
              "sampling.every_n_steps": 2, "sampling.steps": 2, "sampling.prompts": ["zqx, a circle", "a square"],
              "dataset.free_text_encoders": free, **overrides}
    return make_cfg(model, data, root, **values)


def run(cfg, run_dir=None, resume=False, stop_at=None):
    """(adapter path, run folder, the Trainer, weak references to its text encoders taken before they were freed,
    and whether they were all gone by the first step)."""
    run_dir = run_dir or runs.create_run_dir(cfg)
    trainer = Trainer(cfg, run_dir, callbacks=[EventLog(run_dir / "events.jsonl")])
    refs, gone_at_first_step = [], []
    real = trainer._free_text_encoders

    def spy():
        refs.extend(weakref.ref(m) for m in trainer.base.text_encoders.values())
        real()

    def on_event(event):
        if isinstance(event, Progress) and not gone_at_first_step:
            gc.collect()
            gone_at_first_step.append(all(r() is None for r in refs))
        if stop_at and isinstance(event, Progress) and event.step == stop_at:
            trainer.inbox.request("stop")
    trainer._free_text_encoders = spy
    trainer.callbacks.append(on_event)
    path = trainer.run(resume=resume)
    return path, run_dir, trainer, refs, gone_at_first_step[:1] == [True]


def samples(run_dir) -> dict[str, bytes]:
    return {p.name: np.asarray(Image.open(p)).tobytes() for p in sorted((run_dir / "samples").glob("*.png"))}


def assert_same_run(plain, freed):
    (a, a_dir, *_), (b, b_dir, *_) = plain, freed
    assert_same_tensors(tensors(a), tensors(b))
    assert samples(a_dir) and samples(a_dir) == samples(b_dir), "the same sample images, bit for bit"
    for step in (2,):  # the checkpoint's adapter too
        ca, cb = (runs.checkpoint_adapter(d / "checkpoints" / f"step-{step:06d}") for d in (a_dir, b_dir))
        assert_same_tensors(tensors(ca), tensors(cb))


def assert_freed(trainer, refs, gone_at_first_step):
    assert refs, "the spy saw the text encoders before they were freed"
    assert gone_at_first_step, "no text encoder is reachable from the first step on (deleted, not moved)"
    assert trainer.base.text_encoders == {} and trainer.base.text_encoder is None
    assert trainer.sample_text is not None


# ----------------------------------------------------------------------------------------------------------------

def test_sd1_run_with_free_text_encoders_equals_one_without_and_resumes(tiny_model_dir, tmp_path):
    torch.manual_seed(0)
    plain = run(config(tiny_model_dir, tmp_path / "a", free=False))
    assert plain[2].sample_text is None and len(plain[2].base.text_encoders) == 1
    freed = run(config(tiny_model_dir, tmp_path / "b", free=True))
    assert_same_run(plain, freed)
    assert_freed(*freed[2:])
    assert "" in freed[2].text_cache, "caption dropout's empty caption was encoded at the start"
    assert "a square" in freed[2].text_cache, "the regularization captions too (no trigger)"

    cfg = config(tiny_model_dir, tmp_path / "c", free=True)
    _, run_dir, *_ = run(cfg, stop_at=2)
    resumed, run_dir, trainer, refs, gone = run(cfg, run_dir=run_dir, resume=True)
    assert_freed(trainer, refs, gone)
    assert_same_tensors(tensors(plain[0]), tensors(resumed))
    assert samples(run_dir)["step-000004-1.png"] == samples(plain[1])["step-000004-1.png"]


@pytest.mark.parametrize("which", ["sd3", "flux"])
def test_sd3_and_flux_runs_with_free_text_encoders_equal_runs_without(which, request, tmp_path):
    model = request.getfixturevalue(f"tiny_{which}_dir")
    # FLUX at 512 T5 tokens: flux.py's pipeline() leaves FluxPipeline's default max_sequence_length (512), so its
    # samples from prompts use 512 tokens whatever model.t5_length says (SD3's pipeline takes t5_length); the
    # encodings made at the start use t5_length, and only at 512 do the two agree (0.07 apart at 16)
    overrides = {"model.t5_length": 16 if which == "sd3" else 512, "validation.split": 0.0,
                 "dataset.regularization_path": "",
                 "sampling.negative_prompt": "blurry"}  # SD3's explicit negative; FLUX (no true CFG) ignores it
    plain = run(config(model, tmp_path / "a", free=False, **overrides))
    freed = run(config(model, tmp_path / "b", free=True, **overrides))
    assert_same_run(plain, freed)
    assert_freed(*freed[2:])
    assert len(plain[2].base.text_encoders) == (3 if which == "sd3" else 2)


@pytest.mark.parametrize("family,negative", [("sd1", ""), ("sd1", "blurry"), ("sdxl", ""), ("sdxl", "blurry"),
                                             ("sd3", ""), ("sd3", "blurry"), ("flux", "")])
def test_pipelines_render_the_same_image_from_embeddings_as_from_prompts(family, negative, request):
    """What free_text_encoders relies on: diffusers' pipelines give bit-identical images from encode_text's outputs
    (through the family's pipeline_text_kwargs) and from the prompts. SDXL without a negative prompt zeroes the
    negative side (force_zeros_for_empty_prompt); SD 1.x and SD3 encode "" then."""
    import dataclasses
    from trainer.models import load_base_model
    fixture = {"sd1": "tiny_model_dir", "sdxl": "tiny_sdxl_dir", "sd3": "tiny_sd3_dir", "flux": "tiny_flux_dir"}
    base = load_base_model(str(request.getfixturevalue(fixture[family])), options={"t5_length": 16})
    settings = dict(num_inference_steps=2, guidance_scale=4.0, height=32, width=32, output_type="np")
    with torch.no_grad():
        text, neg, empty = base.encode_text("zqx, a circle"), base.encode_text(negative) if negative else None, \
            base.encode_text("")
    length = {"max_sequence_length": 16} if family == "flux" else {}  # FluxPipeline's default is 512 tokens
    from_prompt = base.pipeline()("zqx, a circle", negative_prompt=negative or None,
                                  generator=torch.Generator().manual_seed(3), **length, **settings).images
    prefixes = [spec.prefix for spec in base.family.text_encoder_specs]
    without = dataclasses.replace(base, text_encoder=None, text_encoders=dict.fromkeys(prefixes))
    kwargs = base.family.pipeline_text_kwargs(text, neg, empty)
    from_embeddings = without.pipeline()(generator=torch.Generator().manual_seed(3), **kwargs, **settings).images
    assert from_prompt.tobytes() == from_embeddings.tobytes(), np.abs(from_prompt - from_embeddings).max()
    if family != "flux":  # the negative reaches the image: a wrong one would fail the comparison above
        other = base.family.pipeline_text_kwargs(text, base.encode_text("red"), empty)
        changed = without.pipeline()(generator=torch.Generator().manual_seed(3), **other, **settings).images
        assert np.abs(changed - from_embeddings).max() > 0


def test_validate_refuses_free_text_encoders_where_captions_or_encoders_are_needed_later(tmp_path):
    cfg = C.TrainConfig()
    C.apply_overrides(cfg, ["dataset.free_text_encoders=true", "network.text_encoders=[]"])
    assert not [p for p in C.validate(cfg, check_paths=False) if "free_text_encoders" in p]
    for change, why in (("network.text_encoders=['te1']", "a text encoder trains"),
                        ("dataset.cache_text=false", "cache_text is off"),
                        ("dataset.shuffle_tags=true", "shuffle_tags")):
        bad = C.TrainConfig()
        C.apply_overrides(bad, ["dataset.free_text_encoders=true", "network.text_encoders=[]", change])
        found = [p for p in C.validate(bad, check_paths=False) if "free_text_encoders" in p]
        assert len(found) == 1 and why in found[0], (change, found)
    off = C.TrainConfig()
    C.apply_overrides(off, ["dataset.shuffle_tags=true", "dataset.cache_text=false"])
    assert not [p for p in C.validate(off, check_paths=False) if "free_text_encoders" in p], "off: no rule"
