"""Every checkpoint of a run side by side: one grid, a row per checkpoint (labelled with its validation loss and
the best one marked), a column per fixed prompt and seed (the run's sample prompts and seed), so a user judges
the run by eye and by number at once."""
from __future__ import annotations

import contextlib
from pathlib import Path

from PIL import Image

from trainer import runs
from trainer.config import sample_prompts
from trainer.data.captions import dataset_trigger
from trainer.errors import UserError


def compare_checkpoints(run_dir: str | Path, prompts: list[str] | None = None, seeds: list[int] | None = None,
                        steps: int | None = None, size: int | None = None, generator=None,
                        progress=None, hold=None) -> Image.Image:
    """The grid of a run's checkpoints (oldest first). Prompts and seeds default to the run's sampling settings
    (its trigger alone when it has no prompts; seeds sampling.seed and the next one). `generator`: a loaded
    Generator of the run's base model to reuse; `progress(fraction, text)` hears "checkpoint k of n" before each
    row and each denoising step within it. `hold()`: a context manager around each prompt's images, the only time
    the device works (the app's device lock: between them another job gets the device, and may change the
    generator's adapters, so each stretch sets the checkpoint again; unchanged, that costs nothing). What it
    enters as, when not None, is the Generator that stretch uses: the app's cached one of the run's model, so a
    generation on another model in between does not leave two base models in memory."""
    from .generate import Generator
    from .grid import image_grid
    run_dir = Path(run_dir)
    cfg = runs.load_run_config(run_dir)
    checkpoints = runs.checkpoint_dirs(run_dir)
    if not checkpoints:
        raise UserError(f"run {run_dir.name} has no checkpoint yet; compare it after its first one")
    prompts = prompts or sample_prompts(cfg, cfg.dataset.trigger or dataset_trigger(cfg.dataset.path))
    seeds = seeds or [cfg.sampling.seed, cfg.sampling.seed + 1]
    losses, best = runs.validation_losses(run_dir), runs.best_checkpoint(run_dir)
    rows, labels, n = [], [], len(checkpoints)
    for i, checkpoint in enumerate(checkpoints):
        where = f"checkpoint {i + 1} of {n} ({checkpoint.name})"
        if progress:
            progress(i / n, where)
        row = []
        for j, prompt in enumerate(prompts):
            heard = _within(progress, (i + j / len(prompts)) / n, 1 / (n * len(prompts)), where)
            with hold() if hold else contextlib.nullcontext() as held:
                generator = held or generator or Generator(cfg.model.path)
                generator.set_adapters([(str(checkpoint), 1.0)])
                size = size or generator.base.native_resolution  # the first use loads the model: device work
                row += _images(generator, cfg.sampling, prompt, seeds, steps or cfg.sampling.steps, size, heard)
        rows.append(row)
        labels.append(_row_label(checkpoint, losses, best))
    if progress:
        progress(1.0, f"compared {n} checkpoint(s)")
    columns = [f"{_short(p)} / seed {s}" for p in prompts for s in seeds]
    return image_grid(rows, labels, columns)


def _images(generator, sampling, prompt: str, seeds: list[int], steps: int, size: int, progress) -> list:
    """One prompt's images, a column per seed. Consecutive seeds (the default pair) are one batch, which the
    Generator seeds image by image (seed + k): 0.70x the time of one call per image on a CPU (bench_compare.py),
    the same images to within one level of 255 (the batch sums in another order)."""
    if seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        return generator.generate(prompt, sampling.negative_prompt, seeds[0], steps, sampling.guidance, size, size,
                                  len(seeds), progress=progress)
    return [generator.generate(prompt, sampling.negative_prompt, s, steps, sampling.guidance, size, size,
                               progress=progress)[0] for s in seeds]


def _within(progress, start: float, share: float, where: str):
    """A progress callback for one stretch of the whole: its own (fraction, text) mapped into [start, start+share],
    the text after `where`."""
    if progress is None:
        return None
    return lambda fraction, text: progress(start + share * fraction, f"{where}: {text}")


def _row_label(checkpoint: Path, losses: dict[int, float], best) -> str:
    step = int(checkpoint.name.split("-")[1])
    label = checkpoint.name
    if step in losses:
        label += f" val {losses[step]:.4f}"
    if best is not None and best[1] == step:
        label += " best"
    return label


def _short(prompt: str, limit: int = 24) -> str:
    return prompt if len(prompt) <= limit else prompt[: limit - 3] + "..."
