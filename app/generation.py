"""The Generate tab's logic: adapter slots over one cached Generator per base model, comparison grids, exports.

An adapter is anything `trainer.adapter_file` takes: a file, a checkpoint folder or a run folder, always at its
trained strength. Generation refuses to run while a training is active (one device, one job) and holds the
process-wide device lock, so two browser tabs never run the model at once either.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from trainer import (active_run, adapter_file, adapter_weight, checkpoint_dirs, checkpoint_step,  # torch-free:
                     guidance_scale, leaves_folder, list_runs, run_info)  # the heavy names: where they are used

from .device import free_device, get_generator, hold_device
from .errors import AppError
from .files import UploadError, copy_atomic, safe_filename, unique_path

NUM_SLOTS = 4
# the rank a blend holding LyCORIS layers is written at (a plain LoRA, by SVD) unless the user gives one (issue 26;
# the status line says how much of the blend's norm it kept)
LYCORIS_BLEND_RANK = 32


@dataclass
class Slot:
    """One adapter slot of the Generate tab."""
    path: str
    weight: float = 1.0
    enabled: bool = True


def adapter_choices(settings) -> list[tuple[str, str]]:
    """(label, source) of every adapter the user can pick: runs (final or stopped), their checkpoints, uploads
    and exported blends."""
    out = []
    for info in list_runs(settings.runs_dir):
        if info.adapter_path and Path(info.adapter_path).is_file():
            ending = "final" if info.state == "finished" else f"{info.state} at step {info.step}"
            out.append((f"{info.run_dir.name} ({ending})", str(info.adapter_path)))
        checkpoints = checkpoint_dirs(info.run_dir)
        best = [c for c in checkpoints if checkpoint_step(c / "adapter.safetensors") == info.best_step]
        for ckpt in best:  # beside the final adapter: the one the validation loss picked
            out.append((f"{info.run_dir.name} / {ckpt.name} (best validation loss)", str(ckpt)))
        out += [(f"{info.run_dir.name} / {c.name}", str(c)) for c in reversed(checkpoints) if c not in best]
    folder = Path(settings.adapters_dir)
    if folder.is_dir():
        for p in sorted(folder.glob("*.safetensors")):
            out.append((f"{'blend' if p.name.startswith('blend-') else 'uploaded'}: {p.name}", str(p)))
    return out


def add_adapter_upload(settings, file, model_path: str | None = None) -> Path:
    """Keep an uploaded .safetensors adapter (kohya, diffusers or peft layout) after checking that it reads, holds
    only finite values and fits the base model (the Generate tab's, else the app's default)."""
    from trainer import check_adapter

    from .datasets import upload_path
    src = upload_path(file)
    if src.suffix.lower() != ".safetensors":
        raise UploadError(f"{src.name} is not a .safetensors file; convert .ckpt/.pt adapters to .safetensors first")
    try:
        check_adapter(src, settings.base_model if model_path is None else model_path)
    except Exception as e:  # any reader error means the file is not a usable adapter
        raise UploadError(f"{src.name} could not be used as a LoRA adapter: {e}") from None
    folder = Path(settings.adapters_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return copy_atomic(src, unique_path(folder, safe_filename(src.name, "adapter.safetensors")))


def check_slot_paths(settings, slots: list[Slot]) -> None:
    """Adapters come from this app's folders only (runs, uploads and blends, and the folders it may read): a slot
    takes a typed value, and any other server file would be read, and copied into adapters/ by a blend export."""
    roots = (settings.adapters_dir, settings.runs_dir, *settings.readable_dirs())
    for slot in slots:
        if slot.path and all(leaves_folder(slot.path, root) for root in roots):
            raise AppError(f"{Path(slot.path).name} is not one of this app's adapters: pick one from the list, or "
                           f"add the file with 'Add an adapter file'.")


def check_numbers(slots: list[Slot], guidance: float | None = None, rows: list = ()) -> None:
    """The engine's rule for weights and guidance (NaN and infinity refused by name), before the device is taken or
    a model loads: a NaN weight would blend NaN into the model, a NaN guidance draws a flat image."""
    for slot in slots:
        if slot.path:
            adapter_weight(slot.weight, Path(slot.path).name)
    for row in rows:
        if isinstance(row, (int, float)):
            adapter_weight(row, "adapter 1 in a grid row")
    if guidance is not None:
        guidance_scale(guidance, "Guidance")


def _check_idle(settings) -> None:
    busy = active_run(settings.runs_dir)
    if busy is not None:
        raise AppError(f"Run {busy.name} is training on the device. Generation waits until it ends "
                       f"(or stop it in the Train tab): one device runs one job at a time.")


class _Device:
    """The device for one generation: the lock, a training check, the base model with the slots blended."""

    def __init__(self, settings, model_path: str, slots: list[Slot], progress=None):
        self.settings, self.model_path, self.slots, self.progress = settings, model_path, slots, progress

    def __enter__(self):
        self.oom = _out_of_memory_type()
        check_slot_paths(self.settings, self.slots)
        take_device(self.progress)
        try:
            _check_idle(self.settings)
            gen = get_generator(self.model_path)
            if self.progress and not gen.loaded:
                self.progress(0.0, "loading the base model (the first generation only)")
            gen.set_adapters([(s.path, float(s.weight), bool(s.enabled)) for s in self.slots if s.path])
        except BaseException:
            free_device()
            raise
        return gen

    def __exit__(self, kind, error, trace):
        free_device()
        if kind is not None and issubclass(kind, self.oom):  # a user error with advice, not a crash
            from trainer import oom_advice
            raise AppError(f"The device ran out of memory while generating. {oom_advice()} For generation: fewer "
                           f"images at once, or a smaller width and height.") from None


def _out_of_memory_type() -> type:
    import torch
    return torch.OutOfMemoryError


def generate(settings, model_path: str, slots: list[Slot], prompt: str, negative_prompt: str = "", seed: int = 0,
             steps: int = 20, guidance: float = 7.5, width: int = 512, height: int = 512, num_images: int = 1,
             progress=None) -> list:
    """Images from the base model with the enabled adapters blended at their weights."""
    if not prompt.strip():
        raise AppError("Type a prompt first.")
    check_numbers(slots, guidance)
    with _Device(settings, model_path, slots, progress) as gen:
        return gen.generate(prompt, negative_prompt, int(seed), int(steps), float(guidance), int(width),
                            int(height), int(num_images), progress=progress)


def comparison_grid(settings, model_path: str, slots: list[Slot], prompt: str, rows: list, seeds: list[int],
                    negative_prompt: str = "", steps: int = 20, guidance: float = 7.5, width: int = 512,
                    height: int = 512, progress=None):
    """One image: rows are adapter weights (floats) or adapters of one run (its checkpoints), columns are seeds."""
    if not prompt.strip():
        raise AppError("Type a prompt first.")
    if not rows or not seeds:
        raise AppError("Give at least one row (weights or checkpoints) and one seed.")
    check_numbers(slots, guidance, rows)
    with _Device(settings, model_path, slots, progress) as gen:
        target = str(adapter_file(slots[0].path).resolve()) if slots and slots[0].path else None
        return gen.comparison_grid(prompt, rows, seeds, adapter=target, negative_prompt=negative_prompt,
                                   steps=int(steps), guidance=float(guidance), width=int(width), height=int(height),
                                   progress=progress)


def compare_run(settings, run_dir: Path, progress=None):
    """The run's checkpoints side by side (trainer.compare_checkpoints: rows = checkpoints with their validation
    loss and the best one marked, columns = the run's sample prompts x seeds), on the run's own base model."""
    from trainer import compare_checkpoints, load_run_config
    if not checkpoint_dirs(run_dir):  # before loading a model for nothing
        raise AppError(f"{Path(run_dir).name} has no checkpoint yet; compare its checkpoints after the first one.")
    model_path = load_run_config(run_dir).model.path
    # each stretch takes the cached Generator under the device lock; holding none between them, a generation on
    # another model in between leaves one base model in memory
    return compare_checkpoints(run_dir, progress=progress, hold=lambda: _Rendering(settings, progress, model_path))


WAIT_S = 600.0  # a generation, or a compare's stretch, in another tab ends within minutes


def take_device(progress=None) -> None:
    """Wait for the device, saying so: a generation or a compare's stretch (one prompt on one checkpoint) may
    have it; the lock is fair, so a Generate pressed during a compare runs between two of its stretches."""
    if hold_device():
        return
    if progress:
        progress(None, "waiting for the device (another generation or a compare has it)")
    if not hold_device(timeout=WAIT_S):
        raise AppError("The device stayed busy (another generation, or a training starting); try again when it "
                       "is free.")


class _Rendering:
    """The device for one stretch of a long job (a compare's prompt on one checkpoint): it waits for a generation
    that has the device, refuses while a training runs, and turns running out of memory into a message."""

    def __init__(self, settings, progress=None, model_path: str | None = None):
        self.settings, self.progress, self.model_path = settings, progress, model_path

    def __enter__(self):
        """The cached Generator of model_path (None without one), taken under the lock: a generation on another
        model between two stretches replaced it, and the next stretch must not keep the old one alive."""
        take_device(self.progress)
        try:
            _check_idle(self.settings)
            return None if self.model_path is None else get_generator(self.model_path)
        except BaseException:
            free_device()
            raise

    def __exit__(self, kind, error, trace):
        free_device()
        if kind is not None and issubclass(kind, _out_of_memory_type()):
            from trainer import oom_advice
            raise AppError(f"The device ran out of memory while comparing checkpoints. {oom_advice()}") from None


def parse_numbers(text: str, kind=float) -> list:
    """'0, 0.5, 1' -> [0.0, 0.5, 1.0]; a bad item raises AppError naming it."""
    out = []
    for item in text.replace(";", ",").replace("\n", ",").split(","):
        if item.strip():
            try:
                out.append(kind(item.strip()))
            except ValueError:
                raise AppError(f"{item.strip()!r} is not a number; separate values with commas") from None
    return out


def checkpoint_rows(run_dir: Path) -> list[str]:
    """Each checkpoint of a run, then its final adapter: the rows of a per-checkpoint grid."""
    rows = [str(c) for c in checkpoint_dirs(run_dir)]
    final = run_info(run_dir).adapter_path
    if final and Path(final).is_file():
        rows.append(str(final))
    if not rows:
        raise AppError(f"{Path(run_dir).name} has no checkpoints or final adapter yet.")
    return rows


# ----------------------------------------------------------------------------------------------------------------
# exports

def export_run_adapter(run_dir: Path, out_dir: Path, format: str = "kohya", dtype: str = "fp16",
                       step: str | None = None) -> Path:
    """The run's adapter as one file in a layout and precision: its final one (else its newest checkpoint's), or
    the checkpoint at `step` ("best": the lowest validation loss, as `export --step best`)."""
    from trainer import export_adapter, run_checkpoint
    src = adapter_file(run_checkpoint(run_dir, step) if step else run_dir)
    name = safe_filename(run_info(run_dir).name, "lora")
    if checkpoint_step(src) is not None:  # a checkpoint's adapter: say which step
        name += f"-step-{checkpoint_step(src)}" + ("-best" if step == "best" else "")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return Path(export_adapter(src, out_dir / f"{name}-{format}-{dtype}.safetensors", format, dtype))


def export_blend(settings, model_path: str, slots: list[Slot], rank: int | None = None,
                 lycoris_rank: int | None = LYCORIS_BLEND_RANK) -> Path:
    """The Generate tab's current blend as one adapter file in adapters/ (exact when rank is None and the blend
    holds plain LoRA only; see export_blend_report)."""
    return export_blend_report(settings, model_path, slots, rank, lycoris_rank)[0]


def export_blend_report(settings, model_path: str, slots: list[Slot], rank: int | None = None,
                        lycoris_rank: int | None = LYCORIS_BLEND_RANK) -> tuple[Path, str]:
    """The blend's file and the status line's report of it: how much of the blend's norm a rank kept ("" for an
    exact blend). Without `rank`, a blend that cannot be written exactly (LyCORIS layers: LoHa, LoKr, LoCon's
    Tucker core, DoRA) becomes a plain LoRA at `lycoris_rank`."""
    check_numbers(slots)
    if not any(s.path and s.enabled and s.weight for s in slots):
        raise AppError("Enable at least one adapter with a non-zero weight to export a blend.")
    with _Device(settings, model_path, slots) as gen:
        folder = Path(settings.adapters_dir)
        folder.mkdir(parents=True, exist_ok=True)
        out = unique_path(folder, f"blend-{time.strftime('%Y%m%d-%H%M%S')}.safetensors")
        report, used = _write_blend(gen, out, rank, lycoris_rank)
        return out, kept_text(report, used)


def _write_blend(gen, out: Path, rank: int | None, lycoris_rank: int | None) -> tuple[dict | None, int | None]:
    """(the engine's report, the rank used). Which blends are exact is the engine's rule: merge_exact refuses
    LyCORIS layers (AdapterFormatError naming --rank, trainer/adapters/merge.py _refuse_typed), and only then is
    the blend written again at lycoris_rank. A plain blend refused for another reason is refused at a rank too
    (merge_svd stacks a plain blend exactly first), so no plain blend is ever compressed behind the user's back."""
    from trainer import AdapterFormatError
    if rank is not None:
        return gen.export_blend(out, rank=rank), rank
    try:
        return gen.export_blend(out), None
    except AdapterFormatError:
        if lycoris_rank is None:
            raise AppError("This blend holds LyCORIS layers (LoHa, LoKr or DoRA), which are written as a plain LoRA: "
                           "give the rank for LyCORIS layers (32, say).") from None
        return gen.export_blend(out, rank=lycoris_rank), lycoris_rank


def kept_text(report: dict | None, rank: int | None) -> str:
    """One line from merge_svd's report: the norm kept overall and by the worst layer, and which LyCORIS layers
    became plain LoRA (as the CLI's blend prints it, trainer/adapters/cli.py _print_report)."""
    if report is None:
        return ""
    worst, layer = min(report["layers"].items(), key=lambda kv: kv[1]["kept"])
    line = (f"Rank {rank}: kept {report['kept_overall']:.2%} of the blend's norm (lowest layer {layer['kept']:.2%}, "
            f"{worst}).")
    if report.get("converted"):
        kinds = ", ".join(f"{n} {kind}" for kind, n in report["converted"].items())
        line += f" LyCORIS layers became plain LoRA by SVD of their deltas: {kinds}."
    return line


def analyze_slots(settings, slots: list[Slot], progress=None) -> tuple[list[tuple[str, str]], str]:
    """What the adapters in the first two filled slots learned (LoRA paper, section 7): the singular values of each
    one's updates and, for two adapters, subspace-similarity heatmaps. Returns (heatmap images, markdown summary)."""
    from trainer import analyze, load_adapter
    check_slot_paths(settings, slots)
    paths = [slot.path for slot in slots if slot.path][:2]
    if not paths:
        raise AppError("Pick an adapter in a slot (and a second one to compare their subspaces).")
    adapters = []
    for i, p in enumerate(paths):
        if progress:
            progress(i / (len(paths) + 1), f"reading {Path(p).name}")
        adapters.append(load_adapter(p))
    labels = tuple(f"{tag}: {Path(p).stem}" for tag, p in zip("AB", paths)) + ("B",) * (2 - len(paths))
    out = Path(settings.adapters_dir) / "analysis" / time.strftime("%Y%m%d-%H%M%S")
    if progress:
        progress(len(paths) / (len(paths) + 1), "singular values and subspace similarity")
    result = analyze(adapters[0], out, adapters[1] if len(adapters) > 1 else None, labels=labels[:2],
                     sources=tuple(paths) + (labels[1],) * (2 - len(paths)))
    return _heatmaps(result, out), _analysis_text(result)


def _heatmaps(result: dict, out: Path) -> list[tuple[str, str]]:
    heatmaps = result.get("similarity", {}).get("heatmaps", {})
    return [(str(out / v["png"]), k) for k, v in heatmaps.items()]


def _analysis_text(result: dict) -> str:
    lines = ["| adapter | layers | mean effective rank | rank for 90% / 99% of the energy |", "|---|---|---|---|"]
    for name, summary in result["adapters"].items():
        lines.append(f"| {name} | {len(summary['layers'])} | {summary['mean_effective_rank']:.2f} | "
                     f"{summary['mean_rank_90']:.1f} / {summary['mean_rank_99']:.1f} |")
    heatmaps = result.get("similarity", {}).get("heatmaps", {})
    if heatmaps:
        lines.append("\nSubspace similarity phi(i, j) of the top i and j directions of A (1 = the same "
                     "directions; a random pair scores about max(i, j)/d). phi(1, 1) per layer: " +
                     ", ".join(f"`{k}` {v['phi'][0][0]:.2f}" for k, v in heatmaps.items()))
    return "\n".join(lines)
