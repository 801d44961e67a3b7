"""A held-out validation loss that only the adapter moves: fixed images, fixed timesteps, fixed noise, no dropout.

The training loss says little about a LoRA: most of its noise is the random timestep of each step. Evaluating the
same held-out images at the same timesteps with the same noise every time gives a number that falls while the
adapter learns and turns up when it starts to memorise (kohya's sd-scripts and OneTrainer compute the same kind of
deterministic validation loss). The mean over timesteps is the number; the per-timestep values show where it moves.
"""
from __future__ import annotations

import dataclasses
import random

import torch

from . import config as C
from .seeds import VALIDATION, mix
from .data import DatasetError, with_trigger


def split_validation(scan, cfg: C.TrainConfig):
    """(training scan, validation items). validation.path: its images; validation.split: round(split x images)
    of the training images (at least 1), drawn by run.seed. Regularization images are never held out."""
    val = cfg.validation
    if val.path.strip():
        from .data import scan_dataset
        ds = dataclasses.replace(cfg.dataset, path=val.path, regularization_path="", trigger=scan.trigger)
        return scan, [item for item in scan_dataset(ds).items if not item.regularization]
    if val.split <= 0:
        return scan, []
    own = [i for i, item in enumerate(scan.items) if not item.regularization]
    n = max(1, round(val.split * len(own)))
    if n >= len(own):
        raise DatasetError(f"validation.split {val.split:g} holds out {n} of the {len(own)} training images, which "
                           f"leaves none to train on; lower it, or give validation.path a folder of its own")
    held = set(random.Random(cfg.run.seed).sample(own, n))
    train = [item for i, item in enumerate(scan.items) if i not in held]
    return dataclasses.replace(scan, items=train), [scan.items[i] for i in sorted(held)]


class Validator:
    """The validation loss of a Trainer's adapter on fixed items. Latents are drawn once (fixed noise from the
    seed); the conditioning is kept unless a text encoder trains (then it moves with the adapter)."""

    def __init__(self, trainer, items: list):
        self.trainer, self.items = trainer, items
        # (key, point): the family's noise process says where (DDPM: timesteps 200/400/600/800 of 1000; flow:
        # sigmas (k+1)/(count+1)); the key names the point in the events and seeds its fixed noise
        self.points = trainer.noise.validation_points(trainer.cfg.validation.timesteps)
        self._inputs: list[tuple] | None = None

    def _prepare(self) -> list[tuple]:
        """(latents, SizeInfo, caption) per item, from center crops at the item's bucket, posterior sampled with
        a generator of (seed, item)."""
        from .data import crop_geometry, load_pixels, make_buckets, nearest_bucket, size_info
        t, cfg = self.trainer, self.trainer.cfg
        buckets = make_buckets(cfg.dataset.resolution, cfg.dataset.bucket_step) if cfg.dataset.bucketing else \
            [(cfg.dataset.resolution, cfg.dataset.resolution)]
        out = []
        for n, item in enumerate(self.items):
            size = nearest_bucket(item.width, item.height, buckets)
            rng = random.Random(mix(VALIDATION, cfg.run.seed, n, 1))
            _, box = crop_geometry(item, size, "center", rng)
            pixels = load_pixels(item, size, "center", False, rng, box=box).unsqueeze(0)
            latents = t.sample_latents(t.encode_pixels(pixels),
                                       torch.Generator().manual_seed(mix(VALIDATION, cfg.run.seed, n, 2)))
            out.append((latents, size_info(item, size, box), self.caption(item)))
        return out

    def caption(self, item) -> str:
        """An item's caption as validation encodes it: trigger-prefixed, never dropped or shuffled."""
        return with_trigger(item.caption, self.trainer.scan.trigger)

    def captions(self) -> list[str]:
        """Every caption validation encodes (free_text_encoders encodes them before deleting the encoders)."""
        return [self.caption(item) for item in self.items]

    @torch.no_grad()
    def loss(self) -> tuple[float, dict[str, float]]:
        """(mean loss, {timestep: mean loss}) of the adapter as it is now, in eval mode (no LoRA dropout)."""
        from .losses import fixed_noise_loss
        t, cfg = self.trainer, self.trainer.cfg
        if self._inputs is None:
            self._inputs = self._prepare()
        modules = [t.base.denoiser, *t.base.text_encoders.values()]
        modes = [m.training for m in modules]
        for m in modules:
            m.eval()
        try:
            per_t = {}
            for key, point in self.points:
                terms = []
                for n, (latents, size, caption) in enumerate(self._inputs):
                    cond = t.base.conditioning(t.encode_captions([caption]), [size])
                    gen = torch.Generator().manual_seed(mix(VALIDATION, cfg.run.seed, n, 3, key))
                    noise = torch.randn(latents.shape, generator=gen).to(latents.device)
                    terms.append(fixed_noise_loss(t.base, latents, cond, noise, point, t.noise))
                per_t[str(key)] = sum(terms) / len(terms)
        finally:
            for m, mode in zip(modules, modes):
                m.train(mode)
        return sum(per_t.values()) / len(per_t), per_t
