"""Typed events out of the training loop, and commands into it.

The loop knows nothing of its consumers: it calls `emit(event)` on a list of callbacks (minGPT-style). The CLI's
progress bar, `events.jsonl` in the run folder and the UI (which tails that file) are three such consumers.
Commands travel the other way through `commands.jsonl` in the run folder, so any process can send them, and a UI
restarted mid-run can still stop the run it did not start.
"""
from __future__ import annotations

import dataclasses
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar


@dataclass
class Event:
    kind: ClassVar[str] = "event"
    time: float = field(default_factory=time.time, kw_only=True)

    def to_dict(self) -> dict:
        return {"type": self.kind, **dataclasses.asdict(self)}


@dataclass
class Started(Event):
    kind: ClassVar[str] = "started"
    run_dir: str
    total_steps: int
    start_step: int = 0
    num_images: int = 0
    pid: int = 0
    world_size: int = 1  # data-parallel processes (trainer.distributed)
    global_batch: int = 0  # images per optimizer step over every process


@dataclass
class Progress(Event):
    """One optimizer step done."""
    kind: ClassVar[str] = "progress"
    step: int
    total_steps: int
    loss: float
    lr: float
    it_per_s: float
    eta_s: float
    epoch: int = 0
    loss_ema: float = 0.0  # the loss smoothed (debiased exponential moving average, as TensorBoard draws it)
    images_per_s: float = 0.0  # training images per second over every process


@dataclass
class Validation(Event):
    """The held-out validation loss (trainer/validation.py): the mean over fixed timesteps, and each one's."""
    kind: ClassVar[str] = "validation"
    step: int
    loss: float
    per_timestep: dict = field(default_factory=dict)


@dataclass
class SampleWritten(Event):
    kind: ClassVar[str] = "sample"
    step: int
    paths: list[str]
    prompts: list[str]


@dataclass
class CheckpointWritten(Event):
    kind: ClassVar[str] = "checkpoint"
    step: int
    path: str


@dataclass
class Message(Event):
    """A warning or note for the user (skipped images, a fallback taken)."""
    kind: ClassVar[str] = "message"
    level: str
    text: str


@dataclass
class Finished(Event):
    kind: ClassVar[str] = "finished"
    step: int
    adapter_path: str
    stopped: bool = False  # True when a stop request ended the run early


@dataclass
class Failed(Event):
    kind: ClassVar[str] = "failed"
    step: int
    error: str
    advice: str = ""
    last_checkpoint: str = ""


EVENT_TYPES = {cls.kind: cls for cls in (Started, Progress, SampleWritten, CheckpointWritten, Validation, Message,
                                         Finished, Failed)}

Callback = Callable[[Event], None]


def event_from_dict(data: dict) -> Event:
    data = dict(data)
    cls = EVENT_TYPES[data.pop("type")]
    return cls(**data)


class JsonlTail:
    """The records appended to a JSON-lines file since the last read: only complete lines, each file byte read
    once. A file that shrank was replaced, so it is read again from the start (`restarted` says so). The one
    reader of events.jsonl and commands.jsonl; a line that is not a JSON object is skipped."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.offset = 0
        self.restarted = False
        self.lock = threading.Lock()

    def _size(self) -> int:
        try:
            return self.path.stat().st_size
        except OSError:
            return 0

    def read_new(self) -> list[dict]:
        with self.lock:
            size = self._size()
            self.restarted = size < self.offset
            if self.restarted:
                self.offset = 0
            if size == self.offset:
                return []
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read(size - self.offset)
            complete = chunk[: chunk.rfind(b"\n") + 1]
            self.offset += len(complete)
            return [r for r in map(_json_record, complete.split(b"\n")) if r is not None]


def _json_record(line: bytes) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:  # a torn or damaged line
        return None
    return record if isinstance(record, dict) else None


def _event(record: dict) -> Event | None:
    try:
        return event_from_dict(record)
    except (KeyError, TypeError):
        return None


class EventTail:
    """Every event of one events.jsonl, kept in memory and extended with what was appended since the last call."""

    def __init__(self, path: str | Path):
        self.tail = JsonlTail(path)
        self.events: list[Event] = []
        self.lock = threading.Lock()  # two browser tabs tick at once: their chunks must not interleave

    def read(self) -> list[Event]:
        with self.lock:
            new = [e for e in map(_event, self.tail.read_new()) if e is not None]
            if self.tail.restarted:
                self.events = []
            self.events += new
            return list(self.events)


def read_events(path: str | Path) -> list[Event]:
    """Every complete event in an events.jsonl (a half-written last line is ignored)."""
    return EventTail(path).read()


_tails: dict[Path, EventTail] = {}
_tails_lock = threading.Lock()


def tail_events(path: str | Path) -> list[Event]:
    """read_events() for a file read again and again (a live view, a run list): each call reads only what was
    appended since the last one, in this process."""
    key = Path(path).resolve()
    with _tails_lock:
        tail = _tails.setdefault(key, EventTail(key))
    return tail.read()


class EventLog:
    """Callback that appends each event to events.jsonl, flushed per line so readers see it at once."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __call__(self, event: Event) -> None:
        line = json.dumps(event.to_dict()) + "\n"
        with open(self.path, "a+b") as f:
            if f.tell() and _last_byte(f) != b"\n":
                line = "\n" + line  # a torn last line (a crash mid-write) must not swallow this event
            f.write(line.encode("utf-8"))
            f.flush()


def _last_byte(f) -> bytes:
    f.seek(-1, 2)
    return f.read(1)


# ----------------------------------------------------------------------------------------------------------------
# commands in

COMMANDS = ("stop", "save", "sample")
INTERRUPTED = 130  # the exit code of a run a Ctrl+C stopped while it loaded (the shell's code for SIGINT)


def send_command(run_dir: str | Path, command: str) -> None:
    """Ask a running training to stop, save a checkpoint now, or render samples now."""
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}; one of {COMMANDS}")
    with open(Path(run_dir) / "commands.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"command": command, "time": time.time()}) + "\n")


class CommandInbox:
    """Polled by the loop once per step: every command in commands.jsonl, plus local requests. The file starts
    empty for each attempt (runs.begin_attempt, before the trainer process exists), so a stop sent while the model
    still loads counts; reading from the end of the file lost it (issue 15)."""

    def __init__(self, run_dir: str | Path | None = None):
        self.tail = JsonlTail(Path(run_dir) / "commands.jsonl") if run_dir else None
        self.pending: list[str] = []

    def request(self, command: str) -> None:
        """In-process request (a signal handler, a test)."""
        self.pending.append(command)

    def poll(self) -> list[str]:
        out, self.pending = self.pending, []
        if self.tail is not None:
            out += [r["command"] for r in self.tail.read_new() if isinstance(r.get("command"), str)]
        return out
