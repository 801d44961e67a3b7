"""Typed events out of the training loop, and commands into it.

The loop knows nothing of its consumers: it calls `emit(event)` on a list of callbacks (minGPT-style). The CLI's
progress bar, `events.jsonl` in the run folder and the UI (which tails that file) are three such consumers.
Commands travel the other way through `commands.jsonl` in the run folder, so any process can send them, and a UI
restarted mid-run can still stop the run it did not start.
"""
from __future__ import annotations

import dataclasses
import json
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


EVENT_TYPES = {cls.kind: cls for cls in (Started, Progress, SampleWritten, CheckpointWritten, Message, Finished,
                                         Failed)}

Callback = Callable[[Event], None]


def event_from_dict(data: dict) -> Event:
    data = dict(data)
    cls = EVENT_TYPES[data.pop("type")]
    return cls(**data)


def read_events(path: str | Path) -> list[Event]:
    """Every complete event in an events.jsonl (a half-written last line is ignored)."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(event_from_dict(json.loads(line)))
        except (ValueError, KeyError, TypeError):
            continue
    return out


class EventLog:
    """Callback that appends each event to events.jsonl, flushed per line so readers see it at once."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __call__(self, event: Event) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(event.to_dict()) + "\n")
            f.flush()


# ----------------------------------------------------------------------------------------------------------------
# commands in

COMMANDS = ("stop", "save", "sample")


def send_command(run_dir: str | Path, command: str) -> None:
    """Ask a running training to stop, save a checkpoint now, or render samples now."""
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}; one of {COMMANDS}")
    with open(Path(run_dir) / "commands.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"command": command, "time": time.time()}) + "\n")


class CommandInbox:
    """Polled by the loop once per step: returns commands appended since the last poll, plus local requests."""

    def __init__(self, run_dir: str | Path | None = None):
        self.path = Path(run_dir) / "commands.jsonl" if run_dir else None
        self.offset = self.path.stat().st_size if self.path and self.path.exists() else 0
        self.pending: list[str] = []

    def request(self, command: str) -> None:
        """In-process request (a signal handler, a test)."""
        self.pending.append(command)

    def poll(self) -> list[str]:
        out, self.pending = self.pending, []
        if self.path and self.path.exists():
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
            complete = chunk[: chunk.rfind(b"\n") + 1]
            self.offset += len(complete)
            for line in complete.decode("utf-8").splitlines():
                try:
                    out.append(json.loads(line)["command"])
                except (ValueError, KeyError):
                    continue
        return out
