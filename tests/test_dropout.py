"""LoRA dropout with each image's mask from its own seed (trainer/dropout.py; issue 16's exactness)."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from trainer.dropout import ImageDropout, image_seeds, per_image_dropout


def test_an_images_mask_depends_on_its_seed_not_its_batch():
    drop = ImageDropout(0.5, "down.attn.to_q").train()
    x = torch.ones(3, 7, 16)
    with image_seeds([11, 12, 13]):
        three = drop(x)
    with image_seeds([12]):
        alone = drop(x[:1])
    assert torch.equal(three[1], alone[0]), "the same image, the same mask, whatever shares its batch"
    assert not torch.equal(three[0], three[1]), "another image, another mask"
    assert set(three.unique().tolist()) == {0.0, 2.0}, "kept inputs scaled by 1 / (1 - p)"
    other_layer = ImageDropout(0.5, "up.attn.to_q").train()
    with image_seeds([11, 12, 13]):
        assert not torch.equal(other_layer(x), three), "each layer its own mask"


def test_outside_a_training_step_it_is_plain_dropout_and_off_in_eval():
    drop = ImageDropout(0.5, "layer").train()
    x = torch.ones(2, 64)
    assert (drop(x) == 0).any(), "no seeds set (a library's own forward): plain dropout"
    assert torch.equal(drop.eval()(x), x)
    with image_seeds([1, 2, 3]):
        assert (drop.train()(x) == 0).any(), "a batch the seeds do not describe: plain dropout"


def test_a_checkpointed_forward_recomputes_the_same_mask():
    torch.manual_seed(0)
    layer, drop = nn.Linear(16, 16), ImageDropout(0.3, "layer").train()
    x = torch.randn(4, 16)

    def grads(use_checkpoint: bool):
        layer.zero_grad()
        with image_seeds([5, 6, 7, 8]):
            f = (lambda t: layer(drop(t)))
            out = checkpoint(f, x, use_reentrant=False) if use_checkpoint else f(x)
            out.square().sum().backward()
        return layer.weight.grad.clone()

    assert torch.equal(grads(True), grads(False))


def test_injection_puts_it_in_every_lora_layer(tiny_model_dir):
    from trainer import config as C
    from trainer.models import load_base_model
    from trainer.network import inject_lora
    base = load_base_model(str(tiny_model_dir))
    cfg = C.apply_overrides(C.TrainConfig(), ["network.dropout=0.1"])
    inject_lora(base, cfg)
    drops = [m for m in base.denoiser.modules() if isinstance(m, ImageDropout)]
    lora = [m for m in base.denoiser.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert drops and len(drops) == len(lora) and all(d.p == 0.1 for d in drops)
    te = [m for m in base.text_encoders["lora_te"].modules() if isinstance(m, ImageDropout)]
    assert te and not {d.layer for d in te} & {d.layer for d in drops}, "the text encoder's too, keyed apart"
    plain = nn.Sequential(nn.Linear(2, 2))
    per_image_dropout(plain, "default", "unet")  # nothing to replace: no error
