"""What the Train tab's live view shows of one run, read from its folder (`trainer.run_info`, `tail_events`).

Every run's state comes from its run folder, never from a browser session, so several tabs and a restarted app
all see the same thing. `changed()` lets the view send the browser only what changed since its last tick.
"""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

from trainer import (CheckpointWritten, Failed, Finished, Message, Progress, SampleWritten, Started, UserError,
                     Validation, image_grid, load_run_config, run_info, smoothed, tail_events)

MAX_PLOT_POINTS = 1000
# the held-out loss shares the plot with the training loss: its name says what it measures (and why it is smooth)
VALIDATION_CURVE = "validation loss (held-out images, fixed noise)"
SAMPLE_CELL = 160  # px: sample images are shown whole, scaled to this size in the history grid


@dataclass
class SampleSet:
    step: int
    paths: list[str]
    prompts: list[str]


@dataclass
class RunView:
    run_dir: Path
    name: str
    state: str
    step: int = 0
    total_steps: int = 0
    it_per_s: float = 0.0
    eta_s: float = 0.0
    losses: list[tuple[int, float]] = field(default_factory=list)
    samples: list[SampleSet] = field(default_factory=list)  # every sample set, oldest first
    messages: list[str] = field(default_factory=list)
    error: str = ""
    advice: str = ""
    adapter_path: str = ""
    validations: list[tuple[int, float]] = field(default_factory=list)  # the held-out loss by step
    best_step: int | None = None  # the checkpoint with the lowest validation loss
    world_size: int = 1  # data-parallel training processes
    global_batch: int = 0  # images per optimizer step over every process
    images_per_s: float = 0.0
    sample_every: int = 0  # the run's sampling.every_n_steps (0: no samples unless asked for)
    checkpoints: set[int] = field(default_factory=set)  # steps with a checkpoint, each listed once

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.total_steps) if self.total_steps else 0.0


def run_view(run_dir: Path) -> RunView:
    info = run_info(run_dir)
    view = RunView(Path(run_dir), info.name, info.state, info.step, info.total_steps, error=info.error,
                   advice=info.advice, adapter_path=str(info.adapter_path or ""), best_step=info.best_step,
                   sample_every=_sample_every(run_dir))
    for e in tail_events(Path(run_dir) / "events.jsonl"):
        _apply(view, e)
    view.step = max(view.step, info.step)
    return view


def _sample_every(run_dir: Path) -> int:
    """The run's sampling.every_n_steps; 0 when its config.toml cannot be read (the view shows the rest)."""
    try:
        return load_run_config(run_dir).sampling.every_n_steps
    except (UserError, OSError):
        return 0


def _apply(view: RunView, e) -> None:
    if isinstance(e, Started):
        view.total_steps, view.world_size, view.global_batch = e.total_steps, e.world_size, e.global_batch
        view.losses = [(s, v) for s, v in view.losses if s <= e.start_step]  # a resume replays later steps
        view.validations = [(s, v) for s, v in view.validations if s <= e.start_step]
        view.samples = [s for s in view.samples if s.step <= e.start_step]
    elif isinstance(e, Progress):
        view.step, view.total_steps, view.it_per_s, view.eta_s = e.step, e.total_steps, e.it_per_s, e.eta_s
        view.images_per_s = e.images_per_s
        view.losses.append((e.step, e.loss))
    elif isinstance(e, Validation):
        view.validations = [(s, v) for s, v in view.validations if s != e.step] + [(e.step, e.loss)]
    elif isinstance(e, SampleWritten):
        view.samples = [s for s in view.samples if s.step != e.step] + [SampleSet(e.step, e.paths, e.prompts)]
    elif isinstance(e, Message):
        view.messages.append(f"{e.level}: {e.text}")
    elif isinstance(e, CheckpointWritten) and e.step not in view.checkpoints:
        # a stop right after a periodic checkpoint writes the same step's checkpoint again: one checkpoint
        view.checkpoints.add(e.step)
        view.messages.append(f"info: checkpoint at step {e.step}")
    elif isinstance(e, Finished):
        view.step, view.adapter_path = e.step, e.adapter_path
    elif isinstance(e, Failed):
        view.error, view.advice = e.error, e.advice or view.advice


# ----------------------------------------------------------------------------------------------------------------
# the pieces of the view

def progress_html(view: RunView | None) -> str:
    pct = 100 * view.fraction if view else 0
    colour = {"failed": "#d9534f", "stopped": "#e0a800", "finished": "#2e9e5b"}.get(view.state if view else "",
                                                                                   "var(--color-accent)")
    label = f"{view.step} / {view.total_steps} steps" if view else "no run"
    return (f'<div class="ld-progress" role="progressbar" aria-valuenow="{pct:.0f}" aria-valuemin="0" '
            f'aria-valuemax="100"><div class="ld-bar" style="width:{pct:.1f}%;background:{colour}"></div>'
            f'<span class="ld-label">{html.escape(label)}</span></div>')


def status_text(view: RunView) -> str:
    parts = [f"**{view.run_dir.name}** is **{view.state}**", f"step {view.step}/{view.total_steps}"]
    if view.state == "running":
        parts += [f"{view.it_per_s:.2f} it/s ({view.images_per_s:.1f} images/s)", f"ETA {format_eta(view.eta_s)}"]
    if view.world_size > 1:
        parts.append(f"{view.world_size} processes, {view.global_batch} images per step")
    if view.losses:
        parts.append(f"loss {view.losses[-1][1]:.4f} (smoothed {smoothed([v for _, v in view.losses])[-1]:.4f})")
    if view.validations:
        best = f" (best checkpoint: step {view.best_step})" if view.best_step is not None else ""
        parts.append(f"validation {view.validations[-1][1]:.4f}{best}")
    text = " · ".join(parts)
    if view.adapter_path and view.state in ("finished", "stopped"):
        text += f"  \nAdapter: `{Path(view.adapter_path).name}` in the run folder"
    if view.messages:
        text += "  \n" + "  \n".join(html.escape(m) for m in view.messages[-3:])
    return text


def failure_text(view: RunView) -> str:
    if view.state != "failed":
        return ""
    text = f"### The run failed at step {view.step}\n{html.escape(view.error or 'no error message was written')}"
    if view.advice:
        text += f"\n\n**What to try:** {html.escape(view.advice)}"
    return text + "\n\nOpen **Training log** below for the details. To continue from the last checkpoint, pick " \
                  "the run under **Runs** and press **Resume**."


def loss_frame(losses: list[tuple[int, float]], validations: list[tuple[int, float]] = ()):
    """The raw loss, its smoothed curve (an exponential moving average, as TensorBoard draws it) and the held-out
    validation loss for gr.LinePlot, thinned to at most ~MAX_PLOT_POINTS per curve."""
    import pandas as pd  # gradio's own dependency; LinePlot takes a DataFrame
    smooth = smoothed([v for _, v in losses])
    stride = max(1, len(losses) // MAX_PLOT_POINTS)
    keep = list(range(0, len(losses), stride)) + ([len(losses) - 1] if losses and (len(losses) - 1) % stride else [])
    rows = [(losses[i][0], losses[i][1], "raw") for i in keep] + [(losses[i][0], smooth[i], "smoothed") for i in keep]
    rows += [(step, value, VALIDATION_CURVE) for step, value in validations]
    return pd.DataFrame(rows, columns=["step", "loss", "curve"])


def sample_grid(view: RunView):
    """Every sample set as one labelled image: a row per step, a column per prompt, each image whole."""
    from PIL import Image
    if not view.samples:
        return None
    rows = []
    for s in view.samples:
        cells = []
        for path in s.paths:
            try:
                with Image.open(path) as im:
                    cells.append(im.convert("RGB").resize((SAMPLE_CELL, SAMPLE_CELL)))
            except OSError:  # a sample file removed by hand: keep the grid's shape
                cells.append(Image.new("RGB", (SAMPLE_CELL, SAMPLE_CELL), "lightgrey"))
        rows.append(cells)
    width = max(len(r) for r in rows)
    rows = [r + [Image.new("RGB", (SAMPLE_CELL, SAMPLE_CELL), "white")] * (width - len(r)) for r in rows]
    prompts = max((s.prompts for s in view.samples), key=len)
    return image_grid(rows, [f"step {s.step}" for s in view.samples], [f"{i + 1}: {p}" for i, p in enumerate(prompts)])


def sample_prompts_text(view: RunView) -> str:
    if not view.samples:
        return _no_samples_text(view)
    prompts = max((s.prompts for s in view.samples), key=len)
    return "Columns: " + "; ".join(f"**{i + 1}** {html.escape(p)}" for i, p in enumerate(prompts))


def _no_samples_text(view: RunView) -> str:
    """Why the sample history is empty: samples are off, or the first sample step has not come."""
    if view.sample_every <= 0:
        return "No samples yet: set **Sample every n steps** before starting, or press **Render samples now**."
    first = max(1, -(-view.step // view.sample_every)) * view.sample_every  # the next multiple (this one renders)
    if view.state == "running":
        return f"First samples at step {first} (every {view.sample_every} steps), or press **Render samples now**."
    return f"No samples: the run ended at step {view.step}, before its first samples at step {first}."


def format_eta(seconds: float) -> str:
    if seconds <= 0:
        return "-"
    m, s = divmod(int(seconds + 0.5), 60)
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m" if h else (f"{m}m {s:02d}s" if m else f"{s}s")


def read_log(run_dir: Path | None, max_chars: int = 20_000) -> str:
    if run_dir is None:
        return "No run selected."
    path = Path(run_dir) / "train.log"
    if not path.exists():
        return "This run has no train.log (it was started from the command line, or has not started yet)."
    text = path.read_text(encoding="utf-8", errors="replace")
    return text[-max_chars:] if text else "(the log is empty so far)"
