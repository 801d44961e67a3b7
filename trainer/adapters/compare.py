"""Every checkpoint of a run side by side: one grid, a row per checkpoint (labelled with its validation loss and
the best one marked), a column per fixed prompt and seed (the run's sample prompts and seed), so a user judges
the run by eye and by number at once."""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from trainer import runs
from trainer.config import sample_prompts
from trainer.data.captions import dataset_trigger
from trainer.errors import UserError


def compare_checkpoints(run_dir: str | Path, prompts: list[str] | None = None, seeds: list[int] | None = None,
                        steps: int | None = None, size: int | None = None, generator=None,
                        progress=None) -> Image.Image:
    """The grid of a run's checkpoints (oldest first). Prompts and seeds default to the run's sampling settings
    (its trigger alone when it has no prompts; seeds sampling.seed and the next one). `generator`: a loaded
    Generator of the run's base model to reuse; `progress(fraction, text)` hears of each row."""
    from .generate import Generator
    from .grid import image_grid
    run_dir = Path(run_dir)
    cfg = runs.load_run_config(run_dir)
    checkpoints = runs.checkpoint_dirs(run_dir)
    if not checkpoints:
        raise UserError(f"run {run_dir.name} has no checkpoint yet; compare it after its first one")
    prompts = prompts or sample_prompts(cfg, cfg.dataset.trigger or dataset_trigger(cfg.dataset.path))
    seeds = seeds or [cfg.sampling.seed, cfg.sampling.seed + 1]
    generator = generator or Generator(cfg.model.path)
    size = size or generator.base.native_resolution
    losses, best = runs.validation_losses(run_dir), runs.best_checkpoint(run_dir)
    rows, labels = [], []
    for i, checkpoint in enumerate(checkpoints):
        if progress:
            progress(i / len(checkpoints), f"rendering {checkpoint.name} ({i + 1} of {len(checkpoints)})")
        generator.set_adapters([(str(checkpoint), 1.0)])
        rows.append([generator.generate(p, cfg.sampling.negative_prompt, s, steps or cfg.sampling.steps,
                                        cfg.sampling.guidance, size, size)[0] for p in prompts for s in seeds])
        labels.append(_row_label(checkpoint, losses, best))
    columns = [f"{_short(p)} / seed {s}" for p in prompts for s in seeds]
    return image_grid(rows, labels, columns)


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
