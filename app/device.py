"""One device, one job: the lock that a generation or the start of a training holds, and the base models the
Generate tab keeps loaded (dropped when a training starts, so it gets the device memory)."""
from __future__ import annotations

import gc
import sys
import threading

_device_lock = threading.Lock()
_generators: dict[str, object] = {}


def hold_device(timeout: float = 1.0) -> bool:
    """Take the device for one job (a generation, or starting a training); False when something else has it."""
    return _device_lock.acquire(timeout=timeout)


def free_device() -> None:
    _device_lock.release()


def get_generator(model_path: str):
    """The Generator of a base model, loaded once and kept (switching models drops the old one to free memory)."""
    from trainer import Generator
    key = model_path or ""
    if key not in _generators:
        _generators.clear()
        _generators[key] = Generator(model_path=key)
    return _generators[key]


def release_models() -> None:
    """Drop the cached base models so a training that starts now has the device memory to itself."""
    _generators.clear()
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
