"""The CLI: `python -m trainer train|export|presets|validate|blend|resize|bake|analyze|generate`.

Exit codes: 0 success, 1 a training failure (NaN, out of memory), 2 a config or data error (message on stderr).
"""
from __future__ import annotations

import argparse
import shutil
import signal
import sys
from pathlib import Path

from . import config as C

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (C.ConfigError, UserError) + _input_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


class UserError(Exception):
    """Bad input that the user can fix; printed without a traceback."""


def _input_errors() -> tuple[type[Exception], ...]:
    """The engine's own bad-input errors (a file, folder or model the user gave); each message names the fix."""
    from .data import DatasetError
    from .formats import AdapterFormatError
    from .models import ModelLoadError
    return DatasetError, AdapterFormatError, ModelLoadError


# keys that change what a checkpoint holds or which batches come next: a resumed run must keep them
FROZEN_ON_RESUME = ("network.", "run.", "dataset.", "model.", "optimizer.name", "schedule.gradient_accumulation")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer", description="loradesk: train and manage LoRA adapters")
    sub = p.add_subparsers(metavar="COMMAND")

    t = sub.add_parser("train", help="train a LoRA", description="Train a LoRA. Keys for --set: "
                       + ", ".join(f.key for f in C.fields()))
    t.add_argument("--config", help="TOML config or preset (sparse; applied over the defaults)")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set network.rank=16 (repeatable)")
    t.add_argument("--resume", nargs="?", const=True, default=None, metavar="RUN_DIR",
                   help="continue a stopped or crashed run from its last checkpoint")
    t.add_argument("--run-dir", help="use this run folder (holding config.toml) instead of creating one")
    t.add_argument("--quiet", action="store_true", help="no progress bar (events still go to events.jsonl)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("export", help="write a run's adapter in another format or precision")
    e.add_argument("run_dir", help="run folder (or an adapter .safetensors)")
    e.add_argument("--format", choices=["kohya", "diffusers"], default="kohya")
    e.add_argument("--dtype", choices=["fp16", "fp32", "bf16"], default="fp16")
    e.add_argument("--out", required=True, help="output .safetensors")
    e.set_defaults(func=cmd_export)

    pr = sub.add_parser("presets", help="list the shipped presets")
    pr.set_defaults(func=cmd_presets)

    v = sub.add_parser("validate", help="check a config without training")
    v.add_argument("--config", required=True)
    v.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    v.set_defaults(func=cmd_validate)

    try:
        from .adapters.cli import register
    except ImportError:  # the adapter toolkit is optional at import time for the core CLI
        register = None
    if register:
        register(sub)
    return p


# ----------------------------------------------------------------------------------------------------------------

def resolve_config(config_path: str | None, overrides: list[str]) -> C.TrainConfig:
    """A preset or config file (or the defaults), a preset name from presets/, then --set overrides."""
    if config_path is None:
        return C.apply_overrides(C.TrainConfig(), overrides)
    path = Path(config_path)
    if not path.exists() and (PRESETS_DIR / f"{config_path}.toml").exists():
        path = PRESETS_DIR / f"{config_path}.toml"
    cfg = C.load(path)
    if path.resolve().parent == PRESETS_DIR:  # a shipped preset's examples/ folders, from any working directory
        C.find_folders_under(cfg, PRESETS_DIR.parent)
    return C.apply_overrides(cfg, overrides)


def cmd_train(args) -> int:
    from . import runs
    from .events import EventLog
    from .loop import Trainer

    run_dir, resume, created = _train_run_dir(args)
    cfg = runs.load_run_config(run_dir)
    C.check(cfg, source=str(run_dir / "config.toml"))
    trainer = Trainer(cfg, run_dir)
    trainer.callbacks.append(EventLog(run_dir / "events.jsonl"))
    if not args.quiet:
        trainer.callbacks.append(ProgressBar())
    _stop_on_interrupt(trainer)
    try:
        path = trainer.run(resume=resume)
    except (C.ConfigError,) + _input_errors() as e:
        _fail(trainer, str(e))
        if created and not hasattr(trainer, "started_at"):
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing happened: leave no empty run behind
        raise
    if path is None:
        return 1
    print(f"adapter: {path}")
    return 0


def _train_run_dir(args) -> tuple[Path, bool, bool]:
    """(run folder, resume?, created now?): given with --run-dir, resumed, or new (holding the resolved config)."""
    from . import runs
    from .loop import runtime_problems
    if args.resume is True and not args.run_dir:
        raise UserError("--resume needs the run folder, e.g. --resume runs/my-lora-20261125-101500")
    resume_dir = args.resume if isinstance(args.resume, str) else None
    if resume_dir:
        if not runs.last_checkpoint(resume_dir):
            raise UserError(f"{resume_dir} has no checkpoint to resume from; set saving.every_n_steps to write "
                            f"checkpoints, or start a new run")
        if args.config:
            raise UserError("--resume reads the config from the run folder; pass changes with --set, not --config")
        if args.set:  # e.g. --set schedule.max_steps=2000 to train a finished run longer
            _resume_overrides(Path(resume_dir), args.set)
        return Path(resume_dir).resolve(), True, False
    if args.run_dir:
        if args.config or args.set:
            raise UserError("--run-dir reads the config from the run folder; do not pass --config or --set with it")
        return Path(args.run_dir).resolve(), bool(args.resume), False
    cfg = resolve_config(args.config, args.set)
    C.check(cfg, source=args.config)
    problems = runtime_problems(cfg)
    if problems:
        raise C.ConfigError(problems, args.config)
    return runs.create_run_dir(cfg).resolve(), False, True


def _resume_overrides(run_dir: Path, overrides: list[str]) -> None:
    """Apply --set to a run being resumed, refusing keys the checkpoint or the batch order depend on."""
    from . import runs
    frozen = [o.split("=", 1)[0].strip() for o in overrides
              if o.split("=", 1)[0].strip().startswith(FROZEN_ON_RESUME)]
    if frozen:
        raise UserError(f"{', '.join(frozen)} cannot change when resuming (the checkpoint and the batch order depend "
                        f"on them); start a new run instead")
    cfg = C.check(C.apply_overrides(runs.load_run_config(run_dir), overrides))
    runs.write_text_atomic(run_dir / "config.toml", C.dumps(cfg))


def _fail(trainer, message: str) -> None:
    from .events import Failed
    trainer.emit(Failed(step=getattr(trainer, "step", 0), error=message))


def _stop_on_interrupt(trainer) -> None:
    """First Ctrl+C: stop after this step and write the adapter. Second: abort (writes are atomic)."""
    def handler(signum, frame):
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("\nstopping after this step (Ctrl+C again to abort)", file=sys.stderr)
        if trainer.inbox is not None:
            trainer.inbox.request("stop")
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


class ProgressBar:
    """The CLI's consumer of training events: a tqdm bar plus printed messages."""

    def __init__(self):
        self.bar = None

    def __call__(self, event) -> None:
        from tqdm import tqdm
        kind = event.kind
        if kind == "started":
            self.bar = tqdm(total=event.total_steps, initial=event.start_step, unit="step", dynamic_ncols=True)
        elif kind == "progress" and self.bar is not None:
            self.bar.update(event.step - self.bar.n)
            self.bar.set_postfix(loss=f"{event.loss:.4f}", lr=f"{event.lr:.2e}")
        elif kind in ("message", "sample", "checkpoint"):
            text = {"message": lambda: f"{event.level}: {event.text}",
                    "sample": lambda: f"samples at step {event.step}: {', '.join(event.paths)}",
                    "checkpoint": lambda: f"checkpoint at step {event.step}: {event.path}"}[kind]()
            (self.bar.write if self.bar else print)(text)
        elif kind in ("finished", "failed"):
            if self.bar is not None:
                self.bar.close()
            if kind == "failed":
                print(f"training failed: {event.error}\n{event.advice}", file=sys.stderr)


def cmd_export(args) -> int:
    from . import runs
    from .formats import load_adapter, save_adapter
    src = Path(args.run_dir)
    if src.is_dir():
        cfg = runs.load_run_config(src)
        src = runs.final_adapter_path(src, cfg)
        if not src.exists():
            last = runs.last_checkpoint(args.run_dir)
            if last is None:
                raise UserError(f"{args.run_dir} has no final adapter and no checkpoint yet")
            src = last / "adapter.safetensors"
    elif not src.is_file():
        raise UserError(f"{src} is neither a run folder nor an adapter file")
    adapter = load_adapter(src)
    try:
        out = save_adapter(adapter, args.out, format=args.format, dtype=args.dtype, metadata=adapter.metadata)
    except (ValueError, OSError) as e:
        raise UserError(f"cannot write {args.out}: {e}") from None
    print(f"wrote {out} ({args.format}, {args.dtype}, {len(adapter)} modules)")
    return 0


def cmd_presets(args) -> int:
    for path in list_presets():
        first = path.read_text(encoding="utf-8").splitlines()[0] if path.stat().st_size else ""
        note = first.lstrip("# ").strip() if first.startswith("#") else ""
        print(f"{path.stem:20s} {note}")
    return 0


def list_presets() -> list[Path]:
    return sorted(PRESETS_DIR.glob("*.toml"))


def cmd_validate(args) -> int:
    from .loop import runtime_problems
    cfg = resolve_config(args.config, args.set)
    problems = C.validate(cfg) + runtime_problems(cfg)
    if problems:
        raise C.ConfigError(problems, args.config)
    if cfg.dataset.path:
        from .data import scan_dataset
        scan = scan_dataset(cfg.dataset)
        for w in scan.warnings:
            print(f"warning: {w}")
        for s in scan.skipped:
            print(f"skipped: {s.path}: {s.reason}")
        train = [item for item in scan.items if not item.regularization]
        print(f"dataset: {len(train)} images ({scan.num_images} with repeats)")
        if scan.num_reg_images:
            print(f"regularization: {len(scan.items) - len(train)} images, as many per epoch as training images")
    print("config is valid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
