"""Generate images from a base model with a live, fused blend of adapters (the app's Generate tab uses this)."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from trainer.finite import adapter_weight, guidance_scale, seed_value
from trainer.lora_state import Adapter
from trainer.threads import pick_cpu_threads, use_cpu_threads

from trainer.formats import load_adapter
from trainer.runs import adapter_file
from trainer.models import load_base_model
from .blend import FusedBlender
from .grid import image_grid
from .merge import merge_exact, merge_svd, save_merged

Source = Adapter | str | Path
Progress = Callable[[float, str], None]  # (share done, what is happening)


def _step_reporter(progress: Progress | None, steps: int):
    """A diffusers callback_on_step_end that reports each denoising step (None when nobody listens)."""
    if progress is None:
        return None

    def report(pipe, i, timestep, kwargs):
        progress((i + 1) / max(steps, 1), f"step {i + 1} of {steps}")
        return kwargs
    return report


class Generator:
    """Holds one base model (loaded on first use) and a FusedBlender over it; thread-safe."""

    def __init__(self, model_path: str = "", device: str | None = None):
        self.model_path = model_path
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._base = None
        self._pipe = None
        self._blender: FusedBlender | None = None
        self._files: dict[str, tuple[tuple[int, int], Adapter]] = {}  # path -> ((mtime_ns, size), adapter)
        self._lock = threading.RLock()

    # ---- model and adapters --------------------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        """True once the base model is in memory (the first use loads it, which takes a while)."""
        return self._base is not None

    @property
    def base(self):
        """The loaded base model (`BaseModel`), loaded on first use."""
        self._load()
        return self._base

    @property
    def blender(self) -> FusedBlender:
        self._load()
        return self._blender

    def _load(self) -> None:
        with self._lock:
            if self._base is not None:
                return
            # CUDA: half precision (the blender still sums deltas in fp32); CPU: fp32
            dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
            base = load_base_model(self.model_path, dtype=dtype, device=self.device)
            self._pipe = base.pipeline()
            self._pipe.set_progress_bar_config(disable=True)
            self._blender = FusedBlender.of(base)
            self._base = base

    def set_adapters(self, specs: list[tuple]) -> None:
        """specs: (path or Adapter, weight[, enabled]). Files are read once per (path, mtime); only adapters whose
        file, weight or enabled flag changed are re-blended, and adapters not listed are removed. A file listed
        twice (two slots of the Generate tab) is blended once at the sum of its enabled weights: what two copies
        of it would do."""
        with self._lock:
            listed: dict[str, tuple[Adapter, list[tuple[float, bool]]]] = {}
            for spec in specs:
                source, weight, enabled = (*spec, True)[:3]
                name, adapter = self._resolve(source)
                weight = adapter_weight(weight, Path(name).name if isinstance(source, (str, Path)) else name)
                listed.setdefault(name, (adapter, []))[1].append((weight, bool(enabled)))
            wanted = {name: (adapter, *_summed(parts)) for name, (adapter, parts) in listed.items()}
            blender = self.blender
            for name in blender.names():
                if name not in wanted:
                    blender.remove(name)
            for name, (adapter, weight, enabled) in wanted.items():
                if name in blender.names() and blender.adapter(name) is adapter:
                    blender.update(name, weight=weight, enabled=enabled)
                else:
                    blender.add(name, adapter, weight, enabled)

    def _resolve(self, source: Source) -> tuple[str, Adapter]:
        if isinstance(source, Adapter):
            return f"adapter@{id(source):x}", source
        path = adapter_file(source).resolve()  # a file, or a checkpoint or run folder's adapter
        stat = path.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        cached = self._files.get(str(path))
        if cached is None or cached[0] != stamp:
            self._files[str(path)] = (stamp, load_adapter(path))
        return str(path), self._files[str(path)][1]

    # ---- images --------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompt: str, negative_prompt: str = "", seed: int = 0, steps: int = 20,
                 guidance: float = 7.5, width: int | None = None, height: int | None = None,
                 num_images: int = 1, progress: Progress | None = None) -> list[Image.Image]:
        """Image k is seeded with seed + k, so it is the same image whatever num_images is. `progress(share, what)`
        hears of the model load and of each denoising step."""
        guidance = guidance_scale(guidance)
        seed = seed_value(seed)
        if self._base is None and progress:
            progress(0.0, "loading the base model")
        self._load()
        with self._lock:
            if self.device == "cpu":  # the free cores, asked now: a thread per core on a busy CPU runs 10x slower
                use_cpu_threads(torch, pick_cpu_threads(ours=torch.get_num_threads()))
            generators = [torch.Generator("cpu").manual_seed(seed + k) for k in range(num_images)]
            result = self._pipe(prompt=[prompt] * num_images, negative_prompt=[negative_prompt] * num_images,
                                num_inference_steps=steps, guidance_scale=guidance, width=width, height=height,
                                generator=generators, output_type="pil",
                                callback_on_step_end=_step_reporter(progress, steps))
            return list(result.images)

    def comparison_grid(self, prompt: str, rows: list[float] | list[str | Path], seeds: list[int],
                        adapter: str | None = None, progress: Progress | None = None,
                        **generate_kwargs) -> Image.Image:
        """Rows: weights of one adapter (default: the first enabled) or checkpoint files that take its place
        (each at that adapter's weight, or 1.0 with none in the blend); columns: seeds. The blend is restored after."""
        if not rows or not seeds:
            raise ValueError("comparison_grid needs at least one row and one seed")
        with self._lock:
            by_weight = all(isinstance(r, (int, float)) for r in rows)
            target = adapter or self._default_target(required=by_weight)
            images, labels, total = [], [], len(rows) * len(seeds)
            for r, row in enumerate(rows):
                with self._row(row, target, by_weight):
                    images.append([self.generate(prompt, seed=s, **generate_kwargs)[0] for s in seeds])
                labels.append(f"weight {row:g}" if by_weight else Path(row).stem)
                if progress:
                    progress((r + 1) * len(seeds) / total, f"{(r + 1) * len(seeds)} of {total} images")
            return image_grid(images, labels, [f"seed {s}" for s in seeds])

    def _default_target(self, required: bool) -> str | None:
        active = list(self.blender.active())
        if not active and required:
            raise ValueError("comparison by weight needs an adapter in the blend; call set_adapters first")
        return active[0] if active else None

    def _row(self, row, target: str | None, by_weight: bool):
        return _WeightRow(self.blender, target, row) if by_weight else _CheckpointRow(self, target, row)

    def export_blend(self, path: str | Path, rank: int | None = None, dtype: str = "fp16") -> dict | None:
        """Write the enabled adapters at their weights as one adapter: exact (rank = sum of ranks; plain LoRA
        only), or compressed to `rank` by SVD of each layer's summed change, any layer types (returns the report
        with the kept norm share)."""
        with self._lock:
            blender = self.blender
            pairs = [(blender.adapter(name), weight) for name, weight in blender.active().items()]
            if not pairs:
                raise ValueError("the blend is empty; add at least one enabled adapter before exporting")
            titles = [Path(name).stem if not name.startswith("adapter@") else None for name in blender.active()]
            titles = titles if all(titles) else None
            if rank is None:
                merged, report = merge_exact(pairs, titles), None
            else:  # the model's W0 for DoRA layers, whose change depends on it
                merged, report = merge_svd(pairs, rank, titles, base=blender.base_weights())
            # the loaded model's index: its true widths and block count for the family's layouts (SD3 writes two)
            save_merged(merged, path, dtype=dtype, index=self.base.module_index())
            return report


def _summed(parts: list[tuple[float, bool]]) -> tuple[float, bool]:
    """(weight, enabled) of one adapter listed several times: its enabled weights add up; with none enabled it is
    off (at its first weight)."""
    on = [weight for weight, enabled in parts if enabled]
    return (sum(on), True) if on else (parts[0][0], False)


class _WeightRow:
    """Within the block the target adapter is on at the row's weight; its weight and on/off state come back after."""

    def __init__(self, blender: FusedBlender, name: str, weight: float):
        self.blender, self.name, self.weight = blender, name, weight

    def __enter__(self):
        self.old = (self.blender.weight(self.name), self.blender.is_enabled(self.name))
        self.blender.update(self.name, weight=self.weight, enabled=True)

    def __exit__(self, *exc):
        self.blender.update(self.name, weight=self.old[0], enabled=self.old[1])


class _CheckpointRow:
    """Within the block a checkpoint file replaces the target adapter (disabled meanwhile, then put back)."""

    def __init__(self, generator: Generator, target: str | None, path):
        self.generator, self.target, self.path = generator, target, path

    def __enter__(self):
        blender = self.generator.blender
        self.was_enabled = bool(self.target) and blender.is_enabled(self.target)
        weight = blender.active().get(self.target, 1.0) if self.target else 1.0
        if self.target:
            blender.set_enabled(self.target, False)
        blender.add("__checkpoint__", self.generator._resolve(self.path)[1], weight)

    def __exit__(self, *exc):
        blender = self.generator.blender
        blender.remove("__checkpoint__")
        if self.target:
            blender.set_enabled(self.target, self.was_enabled)
