"""The CLI: `python -m trainer train|export|presets|validate|blend|resize|bake|analyze|generate|queue`.

It uses only trainer's public API (`trainer/__init__.py`), as the app does.
Exit codes: 0 success, 1 a training failure (NaN, out of memory), 2 a config or data error (message on stderr).
"""
from __future__ import annotations

import _signal  # signal's C half, loaded with the interpreter: importing signal.py first would itself take a while
import os
import sys

STOPPED_EARLY = "stopped before the run started; nothing was written"  # Ctrl+C before the model loads
# what a Ctrl+C must undo until the trainer takes it over (run_here): the run folder this command created
_starting: dict = {"run_dir": None, "resumed": False, "ended": False}


def _end_untouched(code: int):
    """End the process now, after a Ctrl+C that came before anything was written. It may have come while Python
    imported torch, and the interpreter's shutdown over half-imported modules can fail (numpy's __getattr__
    recursing) or exit as killed by SIGINT, even hang; nothing of ours is open, so nothing is lost."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _interrupted_while_starting(signum, frame) -> None:
    """Ctrl+C from the process's start until the trainer takes it over: one line, exit 130, the new run folder
    removed. It ends the process here rather than raise KeyboardInterrupt: raised inside an import, libraries turn
    it into other errors (numpy: "cannot load module more than once per process") or swallow it."""
    run_dir, message = _starting["run_dir"], STOPPED_EARLY
    if _starting["resumed"]:
        message = "stopped before the run resumed; its folder is as it was"
    elif run_dir is not None and _trained(run_dir):  # several processes trained it, and have ended
        message = f"stopped; the run folder {run_dir} is kept"
    elif run_dir is not None:
        import shutil
        shutil.rmtree(run_dir, ignore_errors=True)
    print(message, file=sys.stderr)
    _end_untouched(130)


if __name__ == "__main__":  # the CLI's own process (tests that call main() keep their handlers): first of all
    _signal.signal(_signal.SIGINT, _interrupted_while_starting)

import argparse  # noqa: E402 (after the handler: a Ctrl+C while Python imports is one line too)
import shutil  # noqa: E402
import signal  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

from trainer import (INTERRUPTED, UserError, as_launched, check_config, check_resumable,  # noqa: E402
                     checkpoint_dirs, config_problems, create_run_dir, fields, in_worker, is_main_process,
                     launch_marker, list_presets, os_error_message, preset_note, run_here, run_info,
                     shared_run_dir)


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        if args.func is not cmd_train and signal.getsignal(signal.SIGINT) is _interrupted_while_starting:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # the others stop at a KeyboardInterrupt
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a folder that cannot be written (a read-only runs_dir, a full disk): the file and the fix
        print(f"error: {os_error_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # blend, generate...: their writes are atomic (train ends in the handler above)
        print("stopped (Ctrl+C)", file=sys.stderr)
        return INTERRUPTED


@contextmanager
def _creating_run_dir():
    """Ctrl+C waits while the run folder is created (a folder without its config would be left otherwise), and
    then removes it: the signal is blocked and delivered once the handler knows the folder."""
    block = getattr(signal, "pthread_sigmask", None)  # POSIX; elsewhere the run listing cleans such a folder
    if block is not None:
        block(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        if block is not None:
            block(signal.SIG_UNBLOCK, {signal.SIGINT})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer", description="loradesk: train and manage LoRA adapters")
    sub = p.add_subparsers(metavar="COMMAND")

    t = sub.add_parser("train", help="train a LoRA", description="Train a LoRA. Keys for --set: "
                       + ", ".join(f.key for f in fields()))
    t.add_argument("--config", help="TOML config or preset name (sparse; applied over the defaults)")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set network.rank=16 (repeatable)")
    t.add_argument("--resume", nargs="?", const=True, default=None, metavar="RUN_DIR",
                   help="continue a stopped or crashed run from its last checkpoint")
    t.add_argument("--num-processes", type=int, metavar="N",
                   help="data-parallel processes on this machine (one per GPU; with --set precision.device=cpu, "
                        "CPU processes over gloo): the same as --set distributed.processes=N")
    t.add_argument("--quiet", action="store_true", help="no progress bar (events still go to events.jsonl)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("export", help="write a run's adapter in another format or precision")
    e.add_argument("source", metavar="RUN_DIR", help="run folder, checkpoint folder or adapter .safetensors")
    e.add_argument("--format", choices=["auto", "kohya", "diffusers", "lora"], default="auto",
                   help="auto: the layout the most programs load for the adapter's family (kohya for SD 1.x/2.x/SDXL, "
                        "diffusers for SD3); lora: any adapter (LoCon, LoHa, LoKr, DoRA) as a plain kohya LoRA of "
                        "--rank R by SVD of each update, which diffusers loads too")
    e.add_argument("--rank", type=int, metavar="R", help="with --format lora: the rank of each exported layer")
    e.add_argument("--model", metavar="M", help="with --format lora: the base model (DoRA's update depends on its "
                                                 "weights); default: the run's own")
    e.add_argument("--dtype", choices=["fp16", "fp32", "bf16"], default="fp16")
    e.add_argument("--out", required=True, help="output .safetensors")
    e.add_argument("--step", help="with a run folder: the checkpoint at this step, or 'best' (the lowest "
                                   "validation loss)")
    e.set_defaults(func=cmd_export)

    pr = sub.add_parser("presets", help="list the shipped presets")
    pr.set_defaults(func=cmd_presets)

    v = sub.add_parser("validate", help="check a config and its dataset on this machine without training")
    v.add_argument("--config", required=True)
    v.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    v.set_defaults(func=cmd_validate)

    from trainer.adapters.cli import register  # blend, resize, bake, analyze, generate
    register(sub)
    from trainer.queue.cli import register as register_queue  # queue add|list|move|remove|resume|stop|run
    register_queue(sub)
    from trainer.caption.cli import register as register_caption  # caption
    register_caption(sub)
    return p


# ----------------------------------------------------------------------------------------------------------------

def resolve_config(config_path: str | None, overrides: list[str]):
    """A preset or config file (or the defaults), a preset name from presets/, then --set overrides; the sampling
    values that follow the model's family where neither says (trainer.resolve_config)."""
    from trainer import resolve_config as resolved
    return resolved(config_path, overrides)


def cmd_train(args) -> int:
    if args.resume is True:
        raise UserError("--resume needs the run folder, e.g. --resume runs/my-lora-20261125-101500")
    if args.num_processes is not None:
        args.set.append(f"distributed.processes={args.num_processes}")
    if args.resume and in_worker():
        raise UserError("--resume under accelerate launch or torchrun: resume with python -m trainer train --resume "
                        "RUN_DIR --num-processes N instead (it starts the processes itself)")
    if args.resume:
        if args.config:
            raise UserError("--resume reads the config from the run folder; pass changes with --set, not --config")
        _starting["resumed"] = True
        run_dir = check_resumable(args.resume, args.set)  # e.g. --set schedule.max_steps=2000 to train longer
    elif in_worker():  # every process of `accelerate launch ... -m trainer train` runs this: one run folder
        cfg = as_launched(resolve_config(args.config, args.set))
        run_dir = shared_run_dir(cfg.saving.runs_dir, lambda: create_run_dir(check_config(cfg, source=args.config)))
    else:
        cfg = check_config(resolve_config(args.config, args.set), source=args.config)
        with _creating_run_dir():
            run_dir = _starting["run_dir"] = create_run_dir(cfg)
    if in_worker():  # one of the processes of `accelerate launch`: process 0 reports, the others only train
        if args.quiet:
            _quiet_libraries()
        return _train_launched(args, run_dir)
    try:
        if args.quiet:
            _quiet_libraries()
        code = run_here(run_dir, resume=bool(args.resume), callbacks=[] if args.quiet else [ProgressBar()])
    except KeyboardInterrupt:  # where main() runs in another program (the CLI's handler ends the process itself)
        code = INTERRUPTED
    except UserError:
        if not args.resume and not _trained(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing happened: leave no empty run behind
        raise
    if code == INTERRUPTED:
        _say_aborted(run_dir, args.resume)
        return code
    return _say_how_it_ended(run_dir, code)


def _say_aborted(run_dir: Path, resumed) -> None:
    """After a Ctrl+C that did not wait for the step (or came while the model loaded): what is kept."""
    if not resumed and not _trained(run_dir):
        shutil.rmtree(run_dir, ignore_errors=True)  # nothing happened: leave no empty run behind
        print("stopped while the model loaded; nothing was written", file=sys.stderr)
        _starting["ended"] = True
        return
    kept = checkpoint_dirs(run_dir)
    print("aborted; " + (f"the last checkpoint ({kept[-1].name}) is kept: resume the run (python -m trainer train "
                         f"--resume {run_dir})" if kept else "no checkpoint had been written yet"), file=sys.stderr)


def _say_how_it_ended(run_dir: Path, code: int) -> int:
    info = run_info(run_dir)
    if code:  # a failed run says why on stderr, --quiet or not
        print(f"training failed: {info.error}" + (f"\n{info.advice}" if info.advice else ""), file=sys.stderr)
    elif info.adapter_path is None:
        print("stopped before the first training step; no adapter was written", file=sys.stderr)
    else:
        print(f"adapter: {info.adapter_path}")
    return code


def _train_launched(args, run_dir: Path) -> int:
    main = is_main_process()
    try:
        code = run_here(run_dir, resume=bool(args.resume), callbacks=[ProgressBar()] if main and not args.quiet else [])
    finally:
        if main and not args.resume:
            launch_marker(run_dir.parent).unlink(missing_ok=True)
    return _say_how_it_ended(run_dir, code) if main else code


def _quiet_libraries() -> None:
    """--quiet: no progress bars of transformers and diffusers either ("Loading weights"); errors still print."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging
    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()


def _trained(run_dir: Path) -> bool:
    from trainer import Started, read_events
    return any(isinstance(e, Started) for e in read_events(run_dir / "events.jsonl"))


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
        elif kind in ("finished", "failed") and self.bar is not None:
            self.bar.close()


def cmd_export(args) -> int:
    from trainer import (adapter_file, consumer_warnings, export_adapter, export_plain_lora, load_adapter,
                         run_checkpoint)
    src = adapter_file(run_checkpoint(args.source, args.step) if args.step else args.source)
    if (args.format == "lora") != (args.rank is not None):
        raise UserError("--rank R goes with --format lora (and --format lora needs --rank R)")
    try:
        if args.format == "lora":
            # DoRA's base model defaults to the run's (found from the adapter file's folders)
            out, report = export_plain_lora(src, args.out, args.rank, model=args.model, dtype=args.dtype)
        else:
            out, report = export_adapter(src, args.out, format=args.format, dtype=args.dtype), None
    except (ValueError, OSError) as e:
        raise UserError(f"cannot write {args.out}: {e}") from None
    print(f"wrote {out} ({args.dtype}) from {src}")
    if report is not None:
        print(f"rank {args.rank} keeps {report.kept:.2%} of the updates' norm over {report.layers} layers (the least: "
              f"{report.worst:.2%}, {report.worst_layer})")
    else:
        for line in consumer_warnings(load_adapter(out)):
            print(line)
    return 0


def cmd_presets(args) -> int:
    for path in list_presets():
        print(f"{path.stem:20s} {preset_note(path)}")
    return 0


def cmd_validate(args) -> int:
    from trainer import ConfigError, scan_dataset
    cfg = resolve_config(args.config, args.set)
    problems = config_problems(cfg)
    if problems:
        raise ConfigError(problems, args.config)
    if cfg.dataset.path:
        scan = scan_dataset(cfg.dataset)
        for w in scan.warnings:
            print(f"warning: {w}")
        for s in scan.skipped:
            print(f"skipped: {s.path}: {s.reason}")
        train = [item for item in scan.items if not item.regularization]
        print(f"dataset: {len(train)} images ({scan.num_images} with repeats)"
              + (f", trigger {scan.trigger!r}" if scan.trigger else ""))
        if scan.num_reg_images:
            print(f"regularization: {len(scan.items) - len(train)} images, as many per epoch as training images")
    print("config is valid")
    return 0


if __name__ == "__main__":
    code = main()
    if _starting["ended"]:  # a Ctrl+C while the model loaded: imports may be half done, as in the handler
        _end_untouched(code)
    sys.exit(code)
