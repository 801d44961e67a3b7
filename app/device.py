"""One device, one job: the lock that a generation or the start of a training holds, and the models the app keeps
loaded: the Generate tab's base model or the Dataset tab's caption model, one at a time (dropped when a training
starts, so it gets the device memory)."""
from __future__ import annotations

import collections
import gc
import sys
import threading


class _FairLock:
    """A lock handed over in the order its waiters came. A long job that lets go of the device between stretches
    (a checkpoint comparison, between prompts) and takes it again at once would win a plain lock over and over,
    and a generation waiting for it would be told the device is busy until the whole job ends."""

    def __init__(self):
        self._changed = threading.Condition()
        self._held = False
        self._queue: collections.deque = collections.deque()

    def acquire(self, timeout: float) -> bool:
        me = object()
        with self._changed:
            self._queue.append(me)
            got = self._changed.wait_for(lambda: not self._held and self._queue[0] is me, timeout)
            self._queue.remove(me)
            self._held = self._held or got
            self._changed.notify_all()  # the next in line may be free to go now
            return got

    def release(self) -> None:
        with self._changed:
            self._held = False
            self._changed.notify_all()

    def locked(self) -> bool:
        return self._held


_device_lock = _FairLock()
_generators: dict[str, object] = {}


def hold_device(timeout: float = 1.0) -> bool:
    """Take the device for one job (a generation, or starting a training); False when something else has it for
    longer than `timeout` seconds. Waiters get it in the order they asked."""
    return _device_lock.acquire(timeout=timeout)


def free_device() -> None:
    _device_lock.release()


def device_busy() -> bool:
    """Whether a job holds the device now."""
    return _device_lock.locked()


def get_generator(model_path: str):
    """The Generator of a base model, loaded once and kept (switching models drops the old one to free memory)."""
    from trainer import Generator
    key = model_path or ""
    if key not in _generators:
        _generators.clear()
        _generators[key] = Generator(model_path=key)
    return _generators[key]


def get_captioner(key: tuple, load):
    """The caption model `key` names, loaded by `load()` once and kept like a base model: a preview and the write
    after it load it once; a generation, another captioner or a training start drops it."""
    if key not in _generators:
        _generators.clear()
        _generators[key] = load()
    return _generators[key]


def release_models() -> None:
    """Drop the cached base models so a training that starts now has the device memory to itself."""
    _generators.clear()
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
