"""The Generate tab's logic: one cached Generator per base model, adapter slots, comparison grids, exports.

Generation refuses to run while a training is active (one device, one job) and holds a process-wide lock, so two
browser tabs never run the model at once either.
"""
from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .datasets import upload_path
from .files import UploadError, copy_atomic, safe_filename, unique_path
from .settings import AppSettings
from .training import AppError, active_run, list_runs, run_info

NUM_SLOTS = 4
TINY_SIZE = 64  # the built-in tiny model's training resolution (presets/tiny-demo.toml)
_device_lock = threading.Lock()
_generators: dict[str, object] = {}


@dataclass
class Slot:
    """One adapter slot of the Generate tab."""
    path: str
    weight: float = 1.0
    enabled: bool = True


def hold_device(timeout: float = 1.0) -> bool:
    """Take the device for one job (a generation, or starting a training); False when something else has it."""
    return _device_lock.acquire(timeout=timeout)


def free_device() -> None:
    _device_lock.release()


def release_models() -> None:
    """Drop the cached base models so a training that starts now has the device memory to itself."""
    _generators.clear()
    import gc
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def get_generator(model_path: str):
    """The Generator for a base model, loaded once and kept (switching models drops the old one to free memory)."""
    from trainer.adapters.generate import Generator
    key = model_path or ""
    if key not in _generators:
        _generators.clear()
        _generators[key] = Generator(model_path=key)
    return _generators[key]


def adapter_choices(settings: AppSettings) -> list[tuple[str, str]]:
    """(label, path) of every adapter the user can pick: finished runs' files, their checkpoints, uploads."""
    from trainer.runs import checkpoint_dirs
    out = []
    for info in list_runs(settings):
        if info.adapter_path and Path(info.adapter_path).is_file():
            out.append((f"{info.run_dir.name} (final)", str(info.adapter_path)))
        for ckpt in reversed(checkpoint_dirs(info.run_dir)):
            lora = _checkpoint_adapter(ckpt)
            if lora:
                out.append((f"{info.run_dir.name} / {ckpt.name}", str(lora)))
    folder = Path(settings.adapters_dir)
    if folder.is_dir():
        out += [(f"uploaded: {p.name}", str(p)) for p in sorted(folder.glob("*.safetensors"))]
    return out


def _checkpoint_adapter(ckpt: Path) -> Path | None:
    for name in ("lora.safetensors", "adapter.safetensors"):
        if (ckpt / name).is_file():
            return ckpt / name
    return None


def add_adapter_upload(settings: AppSettings, file) -> Path:
    """Keep an uploaded .safetensors adapter (kohya or diffusers layout) after checking that it reads."""
    from trainer.formats import load_adapter
    src = upload_path(file)
    if src.suffix.lower() != ".safetensors":
        raise UploadError(f"{src.name} is not a .safetensors file; convert .ckpt/.pt adapters to .safetensors first")
    try:
        load_adapter(src)
    except Exception as e:  # any reader error means the file is not a usable adapter
        raise UploadError(f"{src.name} could not be read as a LoRA adapter: {e}") from None
    folder = Path(settings.adapters_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return copy_atomic(src, unique_path(folder, safe_filename(src.name, "adapter.safetensors")))


def _check_idle(settings: AppSettings) -> None:
    busy = active_run(settings)
    if busy is not None:
        raise AppError(f"Run {busy.name} is training on the device. Generation waits until it ends "
                       f"(or stop it in the Train tab): one device runs one job at a time.")


def _prepare(settings: AppSettings, model_path: str, slots: list[Slot]):
    _check_idle(settings)
    gen = get_generator(model_path)
    gen.set_adapters([(s.path, float(s.weight), bool(s.enabled)) for s in slots if s.path])
    return gen


def generate(settings: AppSettings, model_path: str, slots: list[Slot], prompt: str, negative_prompt: str = "",
             seed: int = 0, steps: int = 20, guidance: float = 7.5, width: int = 512, height: int = 512,
             num_images: int = 1) -> list:
    """Images from the base model with the enabled adapters blended at their weights."""
    if not prompt.strip():
        raise AppError("Type a prompt first.")
    if not hold_device():
        raise AppError("The device is busy (another generation, or a training starting); try again in a moment.")
    try:
        gen = _prepare(settings, model_path, slots)
        return gen.generate(prompt, negative_prompt, int(seed), int(steps), float(guidance), int(width),
                            int(height), int(num_images))
    finally:
        free_device()


def comparison_grid(settings: AppSettings, model_path: str, slots: list[Slot], prompt: str, rows: list,
                    seeds: list[int], negative_prompt: str = "", steps: int = 20, guidance: float = 7.5,
                    width: int = 512, height: int = 512):
    """One image: rows are adapter weights (floats) or checkpoint files (paths) of one run, columns are seeds."""
    if not prompt.strip():
        raise AppError("Type a prompt first.")
    if not rows or not seeds:
        raise AppError("Give at least one row (weights or checkpoints) and one seed.")
    if not hold_device():
        raise AppError("The device is busy (another generation, or a training starting); try again in a moment.")
    try:
        gen = _prepare(settings, model_path, slots)
        target = str(Path(slots[0].path).expanduser().resolve()) if slots and slots[0].path else None
        return gen.comparison_grid(prompt, rows, seeds, adapter=target, negative_prompt=negative_prompt,
                                   steps=int(steps), guidance=float(guidance), width=int(width), height=int(height))
    finally:
        free_device()


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
    """The adapter file of each checkpoint of a run, plus the final adapter: the rows of a per-checkpoint grid."""
    from trainer.runs import checkpoint_dirs
    rows = [str(p) for p in (_checkpoint_adapter(c) for c in checkpoint_dirs(run_dir)) if p]
    final = run_info(run_dir).adapter_path
    if final and Path(final).is_file():
        rows.append(str(final))
    if not rows:
        raise AppError(f"{Path(run_dir).name} has no checkpoints or final adapter yet.")
    return rows


# ----------------------------------------------------------------------------------------------------------------
# exports

def export_run_adapter(run_dir: Path, out_dir: Path, format: str = "kohya", dtype: str = "fp16") -> Path:
    """The run's final adapter (or last checkpoint) written as one file in the chosen layout and precision."""
    from trainer.formats import export_file
    run_dir = Path(run_dir)
    info = run_info(run_dir)
    src = Path(info.adapter_path) if info.adapter_path else None
    if src is None or not src.is_file():
        ckpts = [p for p in (_checkpoint_adapter(c) for c in _checkpoints(run_dir)) if p]
        if not ckpts:
            raise AppError(f"{run_dir.name} has no adapter yet: wait for it to finish or save a checkpoint.")
        src = ckpts[-1]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{safe_filename(info.name, 'lora')}-{format}-{dtype}.safetensors"
    return Path(export_file(src, out, format, dtype) or out)


def _checkpoints(run_dir: Path) -> list[Path]:
    from trainer.runs import checkpoint_dirs
    return checkpoint_dirs(run_dir)


def export_blend(settings: AppSettings, model_path: str, slots: list[Slot], rank: int | None = None) -> Path:
    """The Generate tab's current blend as one adapter file in adapters/ (exact when rank is None)."""
    if not any(s.path and s.enabled and s.weight for s in slots):
        raise AppError("Enable at least one adapter with a non-zero weight to export a blend.")
    if not hold_device():
        raise AppError("The device is busy (another generation, or a training starting); try again in a moment.")
    try:
        gen = _prepare(settings, model_path, slots)
        folder = Path(settings.adapters_dir)
        folder.mkdir(parents=True, exist_ok=True)
        out = folder / f"blend-{time.strftime('%Y%m%d-%H%M%S')}.safetensors"
        gen.export_blend(out, rank=rank)
        return out
    finally:
        free_device()


def analyze_slots(settings: AppSettings, slots: list[Slot]) -> tuple[list[tuple[str, str]], str]:
    """What the adapters in the first two filled slots learned (LoRA paper, section 7): the singular values of each
    one's updates and, for two adapters, subspace-similarity heatmaps. Returns (heatmap images, markdown summary)."""
    from trainer.adapters.analyze import analyze
    from trainer.formats import load_adapter
    paths = [slot.path for slot in slots if slot.path][:2]
    if not paths:
        raise AppError("Pick an adapter in a slot (and a second one to compare their subspaces).")
    adapters = [load_adapter(p) for p in paths]
    labels = tuple(f"{tag}: {Path(p).stem}" for tag, p in zip("AB", paths)) + ("B",) * (2 - len(paths))
    out = Path(settings.adapters_dir) / "analysis" / time.strftime("%Y%m%d-%H%M%S")
    result = analyze(adapters[0], out, adapters[1] if len(adapters) > 1 else None, labels=labels[:2],
                     sources=tuple(paths) + (labels[1],) * (2 - len(paths)))
    lines = ["| adapter | layers | mean effective rank | rank for 90% / 99% of the energy |", "|---|---|---|---|"]
    for name, summary in result["adapters"].items():
        lines.append(f"| {name} | {len(summary['layers'])} | {summary['mean_effective_rank']:.2f} | "
                     f"{summary['mean_rank_90']:.1f} / {summary['mean_rank_99']:.1f} |")
    heatmaps = result.get("similarity", {}).get("heatmaps", {})
    if heatmaps:
        lines.append("\nSubspace similarity phi(i, j) of the top i and j directions of A (1 = the same "
                     "directions; a random pair scores about max(i, j)/d). phi(1, 1) per layer: " +
                     ", ".join(f"`{k}` {v['phi'][0][0]:.2f}" for k, v in heatmaps.items()))
    lines.append(f"\nNumbers in `{out / 'analysis.json'}`.")
    return [(str(out / v["png"]), k) for k, v in heatmaps.items()], "\n".join(lines)
