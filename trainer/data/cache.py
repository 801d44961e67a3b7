"""VAE latents cached in memory or on disk, keyed by the image's content and the transform that produced them."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

from trainer.atomic import atomic_path

MODES = ("off", "memory", "disk")
PIPELINE_VERSION = "1"  # bump when load_pixels changes what a (file, size, crop) gives, so old entries are not reused


def cache_folder(ds) -> Path:
    """Where a dataset section's disk latent cache lives: dataset.cache_dir, else .loradesk-cache in the dataset."""
    from trainer.paths import expand_path
    return expand_path(ds.cache_dir) if ds.cache_dir.strip() else expand_path(ds.path) / ".loradesk-cache"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class LatentCache:
    """get/put latents for (item, size, crop_key, flip). `model_key` names the VAE (for example its folder or a
    hash of its weights) so a disk cache shared between base models never mixes their latents. Disk entries are
    safetensors files written atomically; an unreadable entry counts as a miss."""

    def __init__(self, mode: str, folder: Path | str | None = None, model_key: str = ""):
        if mode not in MODES:
            raise ValueError(f"latent cache mode must be one of {', '.join(MODES)}, got {mode!r}")
        if mode == "disk" and folder is None:
            raise ValueError("a disk latent cache needs a folder")
        self.mode = mode
        self.folder = Path(folder) if folder is not None else None
        self.model_key = model_key
        self.hits = 0
        self.misses = 0
        self._memory: dict[str, object] = {}
        self._hashes: dict[tuple, str] = {}
        self.rejected: list[str] = []  # why disk entries were recomputed; the loop reports and clears it

    def file_hash(self, path: Path) -> str:
        """sha256 of the file bytes, computed once per file version (path, size, mtime)."""
        stat = Path(path).stat()
        memo_key = (str(path), stat.st_size, stat.st_mtime_ns)
        if memo_key not in self._hashes:
            self._hashes[memo_key] = file_sha256(path)
        return self._hashes[memo_key]

    def key(self, item, size: tuple[int, int], crop_key: str = "center", flip: bool = False) -> str:
        parts = [PIPELINE_VERSION, self.model_key, self.file_hash(item.path), f"{size[0]}x{size[1]}", str(crop_key),
                 "flip" if flip else "noflip"]
        return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()

    def get(self, item, size: tuple[int, int], crop_key: str = "center", flip: bool = False):
        """The cached latents or None. Disk entries come back on the CPU."""
        if self.mode == "off":
            return None
        key = self.key(item, size, crop_key, flip)
        latents = self._memory.get(key) if self.mode == "memory" else self._read(key, item, size)
        if latents is None:
            self.misses += 1
        else:
            self.hits += 1
        return latents

    def put(self, item, size: tuple[int, int], crop_key: str, latents, flip: bool = False) -> None:
        if self.mode == "off":
            return
        key = self.key(item, size, crop_key, flip)
        if self.mode == "memory":
            self._memory[key] = latents.detach()
        else:
            self._write(key, latents, item, size, crop_key, flip)

    def get_or_compute(self, item, size: tuple[int, int], compute: Callable[[], object], crop_key: str = "center",
                       flip: bool = False):
        latents = self.get(item, size, crop_key, flip)
        if latents is None:
            latents = compute()
            self.put(item, size, crop_key, latents, flip)
        return latents

    def __len__(self) -> int:
        if self.mode == "disk":
            return sum(1 for _ in self.folder.glob("*.safetensors")) if self.folder.is_dir() else 0
        return len(self._memory)

    def _entry(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def _read(self, key: str, item, size: tuple[int, int]):
        """A disk entry only when it verifies: readable, the checksum it was written with, a float dtype, a shape
        that fits the image size, finite. Anything else is recomputed (and said): on main a wrong-shape entry
        trained silently on garbage and a NaN one failed every run with "lower the learning rate"."""
        path = self._entry(key)
        if not path.is_file():
            return None
        problem, latents = _verified(path, size)
        if problem:
            self.rejected.append(f"latent cache entry of {Path(item.path).name} ({problem}) was recomputed")
            path.unlink(missing_ok=True)
            return None
        return latents

    def _write(self, key: str, latents, item, size, crop_key, flip) -> None:
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        metadata = {"source": str(item.path), "size": f"{size[0]}x{size[1]}", "crop": str(crop_key),
                    "flip": str(bool(flip)), "pipeline_version": PIPELINE_VERSION, "model_key": self.model_key}
        tensor = latents.detach().cpu().contiguous()
        metadata.update(shape="x".join(map(str, tensor.shape)), sha256=_tensor_sha256(tensor))
        with atomic_path(self._entry(key)) as tmp:
            save_file({"latents": tensor}, str(tmp), metadata=metadata)


def _tensor_sha256(tensor) -> str:
    import torch
    return hashlib.sha256(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _verified(path: Path, size: tuple[int, int]) -> tuple[str, object]:
    """("", latents) for an entry that verifies, else (what is wrong, None)."""
    import torch
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            meta, latents = f.metadata() or {}, f.get_tensor("latents")
    except Exception:  # safetensors raises its own types for a damaged file
        return "unreadable", None
    if meta.get("sha256") != _tensor_sha256(latents):
        return "its checksum does not match", None
    if not latents.is_floating_point() or latents.dim() < 3 or "x".join(map(str, latents.shape)) != meta.get("shape"):
        return f"shape {tuple(latents.shape)} or dtype {latents.dtype} is not a latent's", None
    height, width = latents.shape[-2:]
    if size[0] % width or size[1] % height or size[0] // width != size[1] // height:
        return f"shape {tuple(latents.shape)} does not fit {size[0]}x{size[1]} pixels", None
    if not torch.isfinite(latents).all():
        return "it holds NaN or infinite values", None
    return "", latents
