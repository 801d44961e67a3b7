"""The training loop: noise, loss, optimizer, checkpoints, samples. Small functions; events out through callbacks.

Randomness of optimizer step s comes only from generators seeded by (run.seed, s) and data order from
(run.seed, epoch), so resuming at step s replays exactly what an uninterrupted run would have done.
"""
from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import config as C
from . import runs
from .checkpoint import load_training_state, save_training_state
from .events import (CheckpointWritten, CommandInbox, Event, Failed, Finished, Message, Progress, SampleWritten,
                     Started, Validation, read_events)
from .advice import advice_for, is_cpu_oom, nan_advice, oom_advice
from .validation import Validator, split_validation
from .atomic import save_image_atomic, set_aside
from .losses import diffusion_loss, loss_weights
from .config import global_batch, world_size
from .distributed import DataParallelUNet, LauncherWatch, process_group_options, share
from .dropout import image_seeds
from .network import inject_lora, trained_text_encoders
from .seeds import mix
from .threads import use_cpu_threads


class TrainingError(RuntimeError):
    """A run that cannot go on (NaN loss, out of memory); `advice` says what to change."""

    def __init__(self, message: str, advice: str = ""):
        super().__init__(message)
        self.advice = advice


@dataclass
class Trainer:
    """One run's training. `cfg` has passed `job.check_config` (the CLI and `job.start_run` check it before
    the run folder exists, so it is checked once)."""
    cfg: C.TrainConfig
    run_dir: Path
    callbacks: list[Callable[[Event], None]] = field(default_factory=list)
    inbox: CommandInbox | None = None
    validator: Validator | None = None  # set by run() when validation.split or validation.path holds images out
    best: tuple[float, int] | None = None  # (validation loss, step) of the best checkpoint so far
    _validated: tuple = (None, None)  # (step, loss) of the last validation: once per step
    _lowest: float | None = None  # lowest validation loss so far, and validations since (validation.patience)
    _stale: int = 0
    step: int = 0
    loaded: bool = False  # the model is loaded: from here a Ctrl+C stops after a step (before, it interrupts)
    stopped_untrained: bool = False  # a stop came before one step was trained: no adapter was written
    checkpointed: int | None = None  # the step of this attempt's last checkpoint (a stop right after one: kept)
    ending: bool = False  # the run's last event (Finished or Failed) is being emitted
    step_images: int = 0  # images the last optimizer step trained, over every process
    rank: int = 0  # this process among `world` data-parallel ones (distributed.py); rank 0 writes every file
    world: int = 1
    # dataset.free_text_encoders: (each sample prompt's, the negative prompt's or None, the empty prompt's)
    # encodings, set when the text encoders were deleted at setup (None while they are there)
    sample_text: tuple | None = None
    denoiser_waits: bool = False  # free_text_encoders on a GPU: the denoiser is moved after the encoders go

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------------------------------------------------
    def emit(self, event: Event) -> None:
        self.ending = self.ending or isinstance(event, (Finished, Failed))
        for cb in self.callbacks:
            cb(event)

    def run(self, resume: bool = False) -> Path | None:
        """Train to the end (or to a stop request); returns the final adapter path, None after a failure."""
        from .data import BatchPlan, scan_dataset
        cfg = self.cfg
        self.inbox = self.inbox or CommandInbox(self.run_dir)
        self.launcher = LauncherWatch(self.run_dir)
        scan = scan_dataset(cfg.dataset)  # fails before any model is loaded
        for warning in scan.warnings:
            self.emit(Message(level="warning", text=warning))
        for skipped in scan.skipped:
            self.emit(Message(level="warning", text=f"skipped {skipped.path}: {skipped.reason}"))
        self.scan, held_out = split_validation(scan, cfg)  # held-out images never enter the batch plan
        # one plan of global batches (batch_size x processes images each), whatever the process count
        per_step = dataclasses.replace(cfg.dataset, batch_size=cfg.dataset.batch_size * world_size(cfg))
        self.plan = BatchPlan(self.scan, per_step, cfg.run.seed)
        self._setup_model()
        if self.world != world_size(cfg):
            raise C.ConfigError([f"distributed.processes x machines is {world_size(cfg)}, but {self.world} "
                                 f"process(es) were started; start the run with python -m trainer train"])
        self.validator = Validator(self, held_out) if held_out else None
        if cfg.dataset.free_text_encoders:
            self._free_text_encoders()
        if self.denoiser_waits:  # the text encoders are gone: now there is room for it (see _place_modules)
            self.base.move(self.base.denoiser, self.device)
            self.base._dtypes.clear()
            self.train_model = self._data_parallel()
        self.total_steps = total_steps(cfg, self.plan.steps_per_epoch)
        self._setup_optimizer()
        self.step = 0
        self.started_at = time.time()
        if resume:
            self.step = self._resume_from(runs.resumable_checkpoint(self.run_dir))
            self.best = runs.best_checkpoint(self.run_dir)
            self._lowest = min(runs.validation_losses(self.run_dir).values(), default=None)
        self.loaded = True
        self.emit(Started(run_dir=str(self.run_dir), total_steps=self.total_steps, start_step=self.step,
                          num_images=self.scan.num_images, pid=_pid(), world_size=self.world,
                          global_batch=global_batch(cfg)))
        start = self.step
        try:
            if self.step == 0 and self.is_main:
                self.validate()  # the base model's value: what the adapter must beat
            stopped = self._loop()
            if stopped and self.step == start:  # stopped before one step: nothing new that looks like an adapter
                self.stopped_untrained = True
                self.emit(Finished(step=self.step, adapter_path="", stopped=True))
                return None
            if not self.is_main:  # the main process writes the adapter and the checkpoint
                return runs.final_adapter_path(self.run_dir, cfg)
            path = self.export_final()
            self.save_checkpoint()  # so a stopped run resumes where it stopped, and a finished one can train longer
        except (TrainingError, OSError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
            self.emit(self._failure(e))
            return None
        self.emit(Finished(step=self.step, adapter_path=str(path), stopped=stopped))
        return path

    def _failure(self, e: Exception) -> Failed:
        """The Failed event of a run that cannot go on: NaN, out of memory (CUDA or CPU), a full or read-only disk.
        Anything else is a bug and propagates (run_here still records it)."""
        if isinstance(e, TrainingError):
            error, advice = str(e), e.advice
        elif isinstance(e, torch.OutOfMemoryError):
            error, advice = f"out of memory: {e}", oom_advice()
        elif isinstance(e, OSError):
            error = f"could not write {e.filename}: {e.strerror}" if e.filename else f"{e.strerror or e}"
            advice = advice_for(str(e))
        elif is_cpu_oom(str(e)):
            error, advice = f"out of CPU memory: {str(e).splitlines()[0][-160:]}", oom_advice("cpu")
        else:
            raise e
        last = runs.last_checkpoint(self.run_dir)
        kept = f"; the last good checkpoint ({last.name}) is kept" if last else "; no checkpoint was written yet"
        return Failed(step=self.step, error=error + kept, advice=advice, last_checkpoint=str(last or ""))

    def _resume_from(self, found: tuple) -> int:
        """The newest checkpoint that verifies; each newer, damaged one is named with why it was skipped."""
        checkpoint, skipped = found
        for path, problem in skipped if self.is_main else ():  # moved aside: kept, never again the "newest" one
            aside = set_aside(path)
            self.emit(Message(level="warning", text=f"skipped checkpoint {path.name}: {problem} (kept as "
                                                    f"{aside.name})"))
        if checkpoint is None:
            raise C.ConfigError([f"{self.run_dir.name} has no checkpoint that verifies; start a new run"])
        if self.is_main and (warning := runs.unverified_warning(checkpoint)):  # no manifest: parsed, not verified
            self.emit(Message(level="warning", text=warning))
        return self._resume_state(checkpoint)

    def _resume_state(self, checkpoint: Path) -> int:
        """Load a checkpoint; a network that no longer matches it is a config error, not a crash."""
        try:
            step = load_training_state(checkpoint, self.params, self.optimizer, self.lr_scheduler)
        except (ValueError, RuntimeError, KeyError) as e:
            raise C.ConfigError([f"{checkpoint} does not fit this config ({e}); resume with the network, dataset "
                                 f"and optimizer settings the run was started with"]) from None
        first = next((e for e in read_events(self.run_dir / "events.jsonl") if isinstance(e, Started)), None)
        self.started_at = first.time if first else self.started_at  # ss_training_started_at of the whole run
        return step

    # ------------------------------------------------------------------------------------------------------------
    def _setup_model(self) -> None:
        from accelerate import Accelerator
        from .data import LatentCache, cache_folder, needs_fresh_pixels
        from .models import load_base_model
        cfg = self.cfg
        device = resolve_device(cfg)
        from accelerate.state import AcceleratorState
        AcceleratorState._reset_state(reset_partial_state=True)  # accelerate's state is a process-wide singleton
        self.accelerator = Accelerator(mixed_precision=cfg.precision.mixed, cpu=device == "cpu",
                                       kwargs_handlers=[process_group_options(cfg)])
        self.device = self.accelerator.device
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        if device == "cpu" and self.world == 1:  # the count the run recorded (several processes: the launcher's)
            use_cpu_threads(torch, cfg.precision.cpu_threads)
        # read in the training precision (FLUX.1's transformer is 48 GB in fp32, 24 in bf16); the VAE in fp32, as
        # place() has always decided its dtype (force_upcast) from a full-precision copy
        self.base = load_base_model(cfg.model.path, family=cfg.model.family, trust_pickle=cfg.model.trust_pickle,
                                    options=C.model_options(cfg), dtype=_frozen_dtype(cfg, device),
                                    vae_dtype=torch.float32)
        torch.manual_seed(cfg.run.seed)  # the LoRA A init
        self.params = inject_lora(self.base, cfg)
        self.trained_encoders = trained_text_encoders(self.base, cfg)  # kohya prefix -> lr, of those that train
        self._place_modules(device)
        self.train_model = None if self.denoiser_waits else self._data_parallel()
        self.noise = self.base.family.noise_process(self.base, cfg)  # draws, targets, weights: the family's
        self.prediction = self.noise.prediction
        use_cache = cfg.dataset.cache_latents != "off" and not needs_fresh_pixels(cfg.dataset)
        cache_dir = cache_folder(cfg.dataset) if cfg.dataset.cache_latents == "disk" else None
        self.latent_cache = LatentCache(cfg.dataset.cache_latents, cache_dir,
                                        model_key=f"posterior-{vae_fingerprint(self.base)}") if use_cache else None
        self.text_cache: dict[str, dict] | None = {} if (cfg.dataset.cache_text and not self.trained_encoders) \
            else None

    def _place_modules(self, device: str) -> None:
        """Frozen weights to the device in the training dtype (a VAE that overflows in fp16, as SDXL's does, says
        force_upcast and stays fp32); LoRA weights in fp32; gradient checkpointing and train modes."""
        cfg, base = self.cfg, self.base
        self.weight_dtype = _frozen_dtype(cfg, device)
        # dataset.free_text_encoders on a GPU: the denoiser waits on the CPU until the text encoders, which encode
        # every caption first, are gone (_free_text_encoders), so the card never holds both (T5-XXL 9.5 GB)
        self.denoiser_waits = cfg.dataset.free_text_encoders and self.device.type != "cpu"
        # (place reads the dtypes once: the loop never walks them per step)
        if cfg.precision.offload_blocks and not base.family.blocks(base.denoiser):
            raise C.ConfigError([f"precision.offload_blocks: {base.family.label}'s {base.family.denoiser_label} has no "
                                 f"transformer blocks to offload (SD 3.5 and FLUX have); set it to 0"])
        base.place(self.device, self.weight_dtype, fp8_denoiser=cfg.precision.fp8_base,
                   keep=(base.denoiser,) if self.denoiser_waits else (), offload_blocks=cfg.precision.offload_blocks)
        for p in self.params.named().values():  # LoRA weights train in fp32 even when the base is fp16/bf16
            p.data = p.data.float()
        if cfg.precision.gradient_checkpointing:
            base.denoiser.enable_gradient_checkpointing()
            for prefix in self.trained_encoders:
                base.text_encoders[prefix].gradient_checkpointing_enable()
        self._train_mode()

    def _data_parallel(self):
        """What the loss runs the UNet through: the model itself, or over several processes a view of it whose
        forward goes through accelerate's DistributedDataParallel wrapper."""
        if self.world == 1 or not self.params.unet:  # text-encoder-only LoRA: their gradients are averaged by hand
            return self.base
        unet = self.base.denoiser
        self.ddp_unet = self.accelerator.prepare_model(unet)
        if "_original_forward" in vars(unet):  # accelerate wrapped the UNet's own forward in autocast: undo it, or
            unet.forward = unet._original_forward  # validation and samples (which call it) would differ by world
            del unet._original_forward
        return dataclasses.replace(self.base, denoiser=DataParallelUNet(self.ddp_unet))

    def _train_mode(self) -> None:
        self.base.denoiser.train()
        for prefix, encoder in self.base.text_encoders.items():
            encoder.train(prefix in self.trained_encoders)

    def _setup_optimizer(self) -> None:
        from diffusers.optimization import get_scheduler
        cfg = self.cfg
        self.optimizer = make_optimizer(cfg, self.params.param_groups())
        self.lr_scheduler = get_scheduler(cfg.schedule.lr_scheduler, self.optimizer,
                                          num_warmup_steps=cfg.schedule.warmup_steps,
                                          num_training_steps=self.total_steps)
        self.optimizer = self.accelerator.prepare_optimizer(self.optimizer)

    # ------------------------------------------------------------------------------------------------------------
    def _loop(self) -> bool:
        """Optimizer steps until the end; True if a stop request ended it early."""
        cfg, start = self.cfg, self.step
        t0, ema, images = time.time(), runs.Ema(), 0
        while self.step < self.total_steps:
            for command in self._commands():
                if command == "stop":
                    return True
                if command == "save" and self.is_main:  # one writer
                    self.save_checkpoint()
                if command == "sample" and self.is_main:
                    self.render_samples()
            loss = self.optimizer_step()
            self.step += 1
            images += self.step_images
            elapsed = max(time.time() - t0, 1e-9)
            rate = (self.step - start) / elapsed
            self.emit(Progress(step=self.step, total_steps=self.total_steps, loss=loss,
                               lr=self.lr_scheduler.get_last_lr()[0], it_per_s=rate,
                               eta_s=(self.total_steps - self.step) / max(rate, 1e-9),
                               epoch=self.epoch(), loss_ema=ema.add(loss), images_per_s=images / elapsed))
            if not self.is_main:  # validation, checkpoints and samples are the main process's
                continue
            if _every(cfg.validation.every_n_steps, self.step):
                self.validate()
            if _every(cfg.saving.every_n_steps, self.step) and self.step < self.total_steps:
                self.save_checkpoint()
            if _every(cfg.sampling.every_n_steps, self.step):
                self.render_samples()
        return False

    def optimizer_step(self) -> float:
        """Accumulate gradients over micro-batches, clip, step; returns the mean loss of the global batch.

        Each process's loss is the sum of its images' weighted losses over the global batch's image count, times
        the process count that DDP's gradient mean divides by: the gradient is the global batch's mean either way.
        """
        cfg = self.cfg
        torch.manual_seed(mix(cfg.run.seed, self.step, 1, self.rank))  # a library's draw, if any: as on resume
        batches = micro_batches(cfg, self.step, self.plan.steps_per_epoch)
        total, self.step_images = torch.zeros((), device=self.device), 0
        for k, batch_index in enumerate(batches):
            mine = self.share_of(batch_index)
            seeds = [mix(cfg.run.seed, batch_index, 5, p) for p in mine[1]]
            with image_seeds(seeds), self._sync(last=k == len(batches) - 1):  # LoRA dropout masks (dropout.py)
                latents, cond, weights, gens, count = self.micro_batch(batch_index, mine)
                self.step_images += count
                with self.accelerator.autocast():
                    losses = diffusion_loss(self.train_model, latents, cond, gens, self.noise)
                    loss = (losses * weights.to(losses.device)).sum() / count
                self.accelerator.backward(loss * self.world / len(batches))
            total += loss.detach() / len(batches)
        total = self._reduce(total, "sum")
        if not torch.isfinite(total):  # every process sees the same sum, so all of them stop here together
            raise TrainingError(f"the loss became {total.item()} at step {self.step + 1}; training stopped",
                                advice=nan_advice(cfg))
        self._reduce_text_encoder_grads()
        if cfg.optimizer.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(list(self.params.named().values()), cfg.optimizer.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total.item()

    def _commands(self) -> list[str]:
        """The commands for this step: the main process reads them and every process acts on the same list."""
        commands = self.inbox.poll() if self.is_main else []
        if self.is_main and self.launcher.launcher_gone():
            self.emit(Message(level="warning", text="the launcher of this run's processes ended (killed?): every "
                                                    "process stops after this step and the adapter is written; "
                                                    "resume the run to train on"))
            commands.append("stop")
        if self.world > 1:
            from accelerate.utils import broadcast_object_list
            commands = broadcast_object_list([commands], from_process=0)[0]
        return commands

    def _sync(self, last: bool):
        """DDP all-reduces the UNet's LoRA gradients on the last micro-batch of a step only."""
        import contextlib
        if self.world == 1 or last or self.train_model is self.base:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(self.ddp_unet)

    def _reduce(self, tensor: torch.Tensor, how: str) -> torch.Tensor:
        return tensor if self.world == 1 else self.accelerator.reduce(tensor, reduction=how)

    def _reduce_text_encoder_grads(self) -> None:
        """The text encoders' LoRA gradients, averaged over the processes (the UNet's are DDP's)."""
        if self.world == 1:
            return
        for params in self.params.text_encoders.values():
            for p in params.values():
                if p.grad is not None:
                    p.grad = self.accelerator.reduce(p.grad, reduction="mean")

    # ------------------------------------------------------------------------------------------------------------
    def epoch(self) -> int:
        """The epoch of the batch the next step starts with."""
        return micro_batches(self.cfg, self.step, self.plan.steps_per_epoch)[0] // self.plan.steps_per_epoch

    def micro_batch(self, batch_index: int, mine: tuple | None = None) -> tuple:
        """This process's share of one global batch from the plan's deterministic order: latents, the UNet's
        conditioning (text, and for SDXL each image's size and crop), per-image loss weights, each image's noise
        generator, and the global batch's image count. Every random draw of an image comes from (seed, batch,
        its position in the global batch), so the share it lands in changes nothing. A process whose share is
        empty (a bucket's last batch smaller than the process count) trains the first image at weight 0."""
        from .data import build_caption
        indices, positions, empty = mine or self.share_of(batch_index)  # `mine`: share_of, computed already
        seed = self.cfg.run.seed
        items = [self.scan.items[indices[p]] for p in positions]
        rngs = [random.Random(mix(seed, batch_index, 3, p)) for p in positions]  # each image's flip, crop, caption
        posteriors, sizes = self.posteriors_of([indices[p] for p in positions], rngs)
        latents = [self.sample_latents(posterior, torch.Generator().manual_seed(mix(seed, batch_index, 4, p)))
                   for posterior, p in zip(posteriors, positions)]
        captions = [build_caption(item, self.cfg.dataset, rng, self.scan.trigger) for item, rng in zip(items, rngs)]
        cond = self.base.conditioning(self.encode_captions(captions), sizes)
        weights = loss_weights(items, self.cfg.loss.prior_loss_weight)
        if empty:
            weights = torch.zeros_like(weights)
        gens = [torch.Generator().manual_seed(mix(seed, batch_index, 2, p)) for p in positions]
        return torch.cat(latents), cond, weights, gens, len(indices)

    def share_of(self, batch_index: int) -> tuple[list[int], list[int], bool]:
        """The global batch's dataset indices, the positions in it this process trains, and whether its share is
        empty (then it trains position 0 at weight 0, see micro_batch)."""
        epoch, pos = divmod(batch_index, self.plan.steps_per_epoch)
        indices = self._epoch_batches(epoch)[pos]
        start, end = share(indices, self.rank, self.world)
        return indices, list(range(start, end)) or [0], start == end

    def sample_latents(self, posterior: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Latents drawn from VAE posteriors [B, 2C, h, w] (mean and std) with `generator`, scaled for the UNet."""
        mean, std = posterior.chunk(2, dim=1)
        if not self.base.family.samples_posterior:  # the posterior's mode, as the family's own trainers take it
            return self.base.latents(mean)
        noise = torch.randn(mean.shape, generator=generator)
        return self.base.latents(mean + std * noise.to(mean.device))

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        if getattr(self, "_epoch_cache", (None,))[0] != epoch:
            self._epoch_cache = (epoch, self.plan.epoch(epoch))
        return self._epoch_cache[1]

    def posteriors_of(self, indices: list[int], rngs: list[random.Random]) -> tuple[list, list]:
        """The VAE posteriors of images as [1, 2C, h, w] each (mean and std) and where each was cropped from
        (SizeInfo); image i's flip and crop are drawn from rngs[i]. Cached when no random augmentation needs fresh
        pixels; sampling happens per step, so a cache hit and a miss give the same latents."""
        from .data import crop_geometry, load_pixels, size_info
        ds, found, sizes, todo = self.cfg.dataset, [], [], {}
        for n, (index, rng) in enumerate(zip(indices, rngs)):
            item, size = self.scan.items[index], self.plan.bucket_of(index)
            flip = ds.flip and rng.random() < 0.5
            _, box = crop_geometry(item, size, ds.crop, rng)
            sizes.append(size_info(item, size, box))
            found.append(self._cached(item, size))
            if found[-1] is None:  # same-size pixels are encoded together (_encode_group)
                todo.setdefault(size, []).append((n, item, load_pixels(item, size, ds.crop, flip, rng, box=box)))
        for size, group in todo.items():
            for (n, item, _), posterior in zip(group, self._encode_group([pixels for *_, pixels in group])):
                found[n] = posterior
                if self.latent_cache is not None:
                    self.latent_cache.put(item, size, ds.crop, posterior.cpu())
        return found, sizes

    def _cached(self, item, size: tuple[int, int]) -> torch.Tensor | None:
        if self.latent_cache is None:
            return None
        cached = self.latent_cache.get(item, size, self.cfg.dataset.crop)
        for text in self.latent_cache.rejected:
            self.emit(Message(level="warning", text=text))
        self.latent_cache.rejected.clear()
        return None if cached is None else cached.to(self.device)

    def _encode_group(self, pixels: list[torch.Tensor]) -> list[torch.Tensor]:
        """Posteriors of same-size pixels [3, h, w]: one VAE call for all of them when they are encoded afresh
        each step (no latent cache; a step's images are always the same ones, so resume stays exact). A posterior
        that is cached is encoded from its image alone: CPU convolutions round differently by batch size (5e-6
        measured on the tiny VAE), so one encoded beside others would make a resumed run (its memory cache empty)
        or a disk cache filled under another seed differ in the last bits. It is encoded once per run anyway."""
        if self.latent_cache is None:
            return list(self.encode_pixels(torch.stack(pixels)).split(1))
        return [self.encode_pixels(p.unsqueeze(0)) for p in pixels]

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE posteriors [B, 2C, h, w] (mean and std) of pixels [B, 3, H, W] in [-1, 1]."""
        dist = self.base.vae.encode(pixels.to(self.device, self.base.vae_dtype)).latent_dist
        return torch.cat([dist.mean, dist.std], dim=1).float()

    def encode_captions(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """The text conditioning of a batch; cached per caption (all of it: both encoders' states for SDXL) when no
        text encoder trains. A cached caption is encoded alone: CPU matmuls may round differently by batch size,
        so one encoded beside others would depend on which captions a batch happened to miss together (a resumed
        run's empty cache, or free_text_encoders encoding every caption at the start, would differ in the last
        bits). It is encoded once per run anyway."""
        if self.text_cache is None:
            return self._encode(captions, grad=bool(self.trained_encoders))
        # with free_text_encoders the cache lives in CPU memory: every caption is encoded before the denoiser comes
        # to the card, and a few hundred T5 encodings (8 MB each for FLUX.1) must not take its place there
        keep = torch.device("cpu") if self.cfg.dataset.free_text_encoders else None
        for caption in dict.fromkeys(captions):
            if caption not in self.text_cache:
                self.text_cache[caption] = {k: v[0].to(keep or v.device)
                                            for k, v in self._encode_cached(caption).items()}
        return {k: torch.stack([self.text_cache[c][k] for c in captions]).to(self.device)
                for k in self.text_cache[captions[0]]}

    def _encode_cached(self, caption: str) -> dict[str, torch.Tensor]:
        if self.sample_text is not None:  # the encoders are gone (free_text_encoders)
            raise RuntimeError(f"the caption {caption!r} was not encoded before the text encoders were freed "
                               f"(dataset.free_text_encoders); this is a bug: please report it")
        return self._encode([caption], grad=False)

    def _encode(self, captions: list[str], grad: bool) -> dict[str, torch.Tensor]:
        with torch.set_grad_enabled(grad), self.accelerator.autocast():
            return {k: v.float() for k, v in self.base.encode_text(captions).items()}

    # ------------------------------------------------------------------------------------------------------------
    def _free_text_encoders(self) -> None:
        """dataset.free_text_encoders: every caption the run can train or validate with, the sample prompts and
        the negative prompt encoded now, then the text encoders deleted, not moved to the CPU: nothing in this
        run needs them again (a resume is a new Trainer that loads them anew), and CPU memory counts too."""
        if self.text_cache is None:  # a text encoder trains or cache_text is off: validate() refuses both
            return
        self.encode_captions(self._every_caption())
        with torch.no_grad():  # as the pipeline encodes a prompt: no autocast, one prompt at a time
            encode = self.base.encode_text
            negative = self.cfg.sampling.negative_prompt
            self.sample_text = ([encode(p) for p in C.sample_prompts(self.cfg, self.scan.trigger)],
                                encode(negative) if negative else None, encode(""))
        # in place: the data-parallel view (dataclasses.replace of base) shares this dict but not text_encoder
        self.base.text_encoders.clear()
        for model in {id(m): m for m in (self.base, self.train_model) if m is not None}.values():
            model.text_encoder = None
        import gc
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _every_caption(self) -> list[str]:
        """The captions build_caption can make this run (shuffle_tags is refused with free_text_encoders, so
        each image has one, plus the empty one of caption dropout) and the validation images' captions."""
        from .data import build_caption
        ds = dataclasses.replace(self.cfg.dataset, caption_dropout=0.0)
        captions = [build_caption(item, ds, random.Random(0), self.scan.trigger) for item in self.scan.items]
        if self.cfg.dataset.caption_dropout > 0:
            captions.append("")
        captions += self.validator.captions() if self.validator else []
        return list(dict.fromkeys(captions))

    # ------------------------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        from .formats import save_adapter
        if self.checkpointed == self.step:  # a stop or save right after a periodic checkpoint: nothing trained since
            return runs.last_checkpoint(self.run_dir)
        loss = self.validate()  # every checkpoint has its validation loss: that is how the best one is found
        with runs.new_checkpoint_dir(self.run_dir, self.step) as tmp:
            save_training_state(tmp, self.params, self.optimizer, self.lr_scheduler, self.step, 0)
            # the family's default layout (kohya for the UNet families; SD3's diffusers layout reads back without
            # the model at hand, where its fused kohya names need the model's block count)
            save_adapter(self.base.injected_adapter(), runs.checkpoint_adapter(tmp),
                         format=self.base.family.layout("auto"), dtype="fp32", metadata=self.metadata(),
                         index=self.base.module_index(), family=self.base.family)
        if loss is not None and (self.best is None or loss < self.best[0]):
            self.best = (loss, self.step)
        runs.prune_checkpoints(self.run_dir, self.cfg.saving.keep_last, keep=self.best[1] if self.best else None)
        path, self.checkpointed = runs.last_checkpoint(self.run_dir), self.step
        self.emit(CheckpointWritten(step=self.step, path=str(path)))
        return path

    def validate(self) -> float | None:
        """The validation loss now (once per step), emitted; asks for a stop once validation.patience
        validations in a row did not beat the lowest one."""
        if self.validator is None:
            return None
        if self._validated[0] == self.step:
            return self._validated[1]
        loss, per_t = self.validator.loss()
        self._validated = (self.step, loss)
        self.emit(Validation(step=self.step, loss=loss, per_timestep=per_t))
        if self._lowest is None or loss < self._lowest:
            self._lowest, self._stale = loss, 0
        else:
            self._stale += 1
            patience = self.cfg.validation.patience
            if patience and self._stale >= patience:
                self.emit(Message(level="info", text=f"the validation loss has not improved for {patience} "
                                                     f"validations: stopping early (validation.patience)"))
                self.inbox.request("stop")
        return loss

    def export_final(self) -> Path:
        """The final adapter in saving.format's layout; for a family no one layout brings to every program (SD3),
        its other layouts beside it as <name>-<layout>.safetensors."""
        from .formats import save_adapter
        path, family = runs.final_adapter_path(self.run_dir, self.cfg), self.base.family
        chosen = family.layout(self.cfg.saving.format)
        adapter, index, metadata = self.base.injected_adapter(), self.base.module_index(), self.metadata()
        others = [f for f in family.layouts if f != chosen] if family.writes_every_layout else []
        for layout in others:
            save_adapter(adapter, path.with_name(f"{path.stem}-{layout}.safetensors"), format=layout,
                         dtype=self.cfg.saving.dtype, metadata=metadata, index=index, family=family)
        return save_adapter(adapter, path, format=chosen, dtype=self.cfg.saving.dtype, metadata=metadata,
                            index=index, family=family)

    def metadata(self) -> dict[str, str]:
        from .formats import build_metadata
        last_batch = micro_batches(self.cfg, self.total_steps - 1, self.plan.steps_per_epoch)[-1]
        epochs = last_batch // self.plan.steps_per_epoch + 1
        return build_metadata(cfg=self.cfg, num_train_images=self.scan.num_images,
                              num_reg_images=self.scan.num_reg_images,
                              tag_frequency=self.scan.tag_frequency(), started_at=self.started_at,
                              finished_at=time.time(), family=self.base.metadata(), prediction=self.prediction,
                              max_train_steps=self.total_steps, num_epochs=max(1, epochs), steps=self.step)

    def render_samples(self) -> list[Path]:
        """Sample prompts with the current adapter at fixed seeds, so steps are comparable; written and emitted."""
        prompts = C.sample_prompts(self.cfg, self.scan.trigger)
        paths = [save_image_atomic(image, self.run_dir / "samples" / f"step-{self.step:06d}-{i}.png")
                 for i, image in enumerate(self.sample_images())]
        self.emit(SampleWritten(step=self.step, paths=[str(p) for p in paths], prompts=prompts))
        return paths

    @torch.no_grad()
    def sample_images(self, output_type: str = "pil") -> list:
        """One image per sample prompt (seed sampling.seed + i), rendered from the adapter as exported: the
        saving.dtype file's factors fused into the base weights with the live LoRA layers off, the way A1111 and
        ComfyUI apply a LoRA, so training samples and the user's own generations agree (issue 17)."""
        from .adapters.blend import fused
        from .formats import as_saved
        from .network import lora_off
        cfg, base = self.cfg, self.base
        exported = as_saved(base.injected_adapter(), cfg.saving.dtype)
        pipe = self._sample_pipeline()
        modules = (base.denoiser, *base.text_encoders.values())
        for module in modules:
            module.eval()
        try:
            with lora_off(*modules), fused(base, exported, keep_on="cpu"):  # W0 copies off the GPU
                return [pipe(**text, num_inference_steps=cfg.sampling.steps, guidance_scale=cfg.sampling.guidance,
                             height=cfg.dataset.resolution, width=cfg.dataset.resolution, output_type=output_type,
                             generator=torch.Generator().manual_seed(cfg.sampling.seed + i)).images[0]
                        for i, text in enumerate(self._sample_text_kwargs())]
        finally:
            self._train_mode()

    def _sample_pipeline(self):
        """The family's pipeline; once the text encoders are freed, one built with None in their places (the
        pipelines take prompt embeddings then and never call them)."""
        base = self.base
        if self.sample_text is None:
            return base.pipeline()
        prefixes = [spec.prefix for spec in base.family.text_encoder_specs]
        return dataclasses.replace(base, text_encoder=None, text_encoders=dict.fromkeys(prefixes)).pipeline()

    def _sample_text_kwargs(self) -> list[dict]:
        """Each sample's text arguments: the prompt itself, or its encoding from the start of the run."""
        if self.sample_text is None:
            negative = self.cfg.sampling.negative_prompt or None
            return [{"prompt": p, "negative_prompt": negative} for p in C.sample_prompts(self.cfg, self.scan.trigger)]
        prompts, negative, empty = self.sample_text
        return [self.base.family.pipeline_text_kwargs(text, negative, empty) for text in prompts]


# ----------------------------------------------------------------------------------------------------------------
# pieces with no state

def micro_batches(cfg: C.TrainConfig, step: int, batches_per_epoch: int) -> list[int]:
    """Global batch indices that optimizer step `step` accumulates over.

    With epochs set, each epoch is ceil(batches / accumulation) steps and the last step of an epoch may hold fewer
    batches, so no step reaches into the next epoch; with max_steps the batches are one endless stream.
    """
    accum = cfg.schedule.gradient_accumulation
    if cfg.schedule.epochs > 0:
        epoch, j = divmod(step, math.ceil(batches_per_epoch / accum))
        return [epoch * batches_per_epoch + k for k in range(j * accum, min((j + 1) * accum, batches_per_epoch))]
    return [step * accum + m for m in range(accum)]


def total_steps(cfg: C.TrainConfig, batches_per_epoch: int) -> int:
    if cfg.schedule.epochs > 0:
        return cfg.schedule.epochs * math.ceil(batches_per_epoch / cfg.schedule.gradient_accumulation)
    return cfg.schedule.max_steps


def make_optimizer(cfg: C.TrainConfig, groups: list[dict]) -> torch.optim.Optimizer:
    o = cfg.optimizer
    if o.name == "adamw":
        return torch.optim.AdamW(groups, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
    if o.name == "adamw8bit":  # job.machine_problems() has checked CUDA and bitsandbytes
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit(groups, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
    if o.name == "adafactor":
        from transformers.optimization import Adafactor
        return Adafactor(groups, scale_parameter=False, relative_step=False, warmup_init=False,
                         weight_decay=o.weight_decay)
    if o.name == "prodigy":
        from prodigyopt import Prodigy
        return Prodigy(groups, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
    raise C.ConfigError([f"optimizer.name {o.name!r} is unknown"])


def resolve_device(cfg: C.TrainConfig) -> str:
    wanted = cfg.precision.device
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return wanted


def _frozen_dtype(cfg: C.TrainConfig, device: str) -> torch.dtype:
    """Frozen weights in half precision save memory on a GPU; on the CPU they stay fp32 (autocast does bf16)."""
    if device == "cuda" and cfg.precision.mixed == "fp16":
        return torch.float16
    if device == "cuda" and cfg.precision.mixed == "bf16":
        return torch.bfloat16
    return torch.float32


def vae_fingerprint(base) -> str:
    """Names the VAE's weights in cache keys, so a model replaced at the same path never reuses old latents."""
    import hashlib
    h = hashlib.sha256(base.source.encode())
    for p in list(base.vae.parameters())[:4]:
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _every(n: int, step: int) -> bool:
    return n > 0 and step % n == 0


def _pid() -> int:
    import os
    return os.getpid()
