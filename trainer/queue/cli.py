"""`python -m trainer queue add|list|move|remove|resume|stop|run`; trainer/__main__.py calls register(subparsers).

Like the rest of the CLI it uses only trainer's public API. A queued command (export, blend, caption) is checked
with that command's own parser when it is added, so a bad flag fails at once (exit 2), as a bad config does.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import shlex
import sys
import time
from pathlib import Path

from trainer import (TrainConfig, UserError, list_queue, move_job, queue_command, queue_train, remove_job,
                     resolve_config, resume_job, run_queue, runner_argv, stop_job)

DEFAULT_RUNS_DIR = TrainConfig().saving.runs_dir


def register(sub) -> None:
    """Add the `queue` command; `sub` (the CLI's subparsers) is kept to check queued commands' arguments."""
    q = sub.add_parser("queue", help="a persistent job queue in the runs folder: add, list, move, remove, resume, "
                                     "stop, run", description="Jobs wait in RUNS_DIR/queue/ (one JSON file each) "
                       "and `queue run` works through them, each in its own process; the queue outlives restarts.")
    actions = q.add_subparsers(metavar="ACTION")
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--runs-dir", help=f"the runs folder that holds the queue (default: {DEFAULT_RUNS_DIR}; for "
                                          f"`add --config`, the config's saving.runs_dir)")

    a = actions.add_parser("add", parents=[where], help="queue a training (--config/--set) or a command",
                           description="Queue a training: add --config X.toml [--set k=v ...] [--name N] (checked "
                           "as train checks it). Or queue a command: add export RUN --out F.safetensors, add blend "
                           "A B --out F.safetensors, add caption DATASET ... (checked by that command's parser).")
    a.add_argument("--config", help="TOML config or preset name (as train --config)")
    a.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="as train --set")
    a.add_argument("--name", help="the run's name (run.name)")
    a.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND ...",
                   help="export|blend|caption and its arguments, instead of a training")
    a.set_defaults(func=lambda args: cmd_add(args, sub))

    actions.add_parser("list", parents=[where], help="the jobs in order, with state and message").set_defaults(
        func=cmd_list)
    m = actions.add_parser("move", parents=[where], help="move a queued job to position N (1 = next)")
    m.add_argument("id")
    m.add_argument("--to", type=int, required=True, metavar="N")
    m.set_defaults(func=cmd_move)
    for name, helptext, func in (("remove", "delete a job that is not running (its run folder is kept)", cmd_remove),
                                 ("resume", "queue a stopped, failed or killed job again (from its last "
                                            "checkpoint)", cmd_resume),
                                 ("stop", "stop a running training after its step (the queue goes on)", cmd_stop)):
        p = actions.add_parser(name, parents=[where], help=helptext)
        p.add_argument("id")
        p.set_defaults(func=func)

    r = actions.add_parser("run", parents=[where], help="work through the queue until it is empty")
    r.add_argument("--gpus", metavar="LIST", help="run only the jobs whose distributed.gpus is this GPU set (one "
                                                  "lane; several lanes may run at once); default: every job, one "
                                                  "at a time")
    r.add_argument("--webhook", action="append", default=[], metavar="URL",
                   help="also POST each job's end to this URL (beside each job's notify.webhook_url)")
    r.add_argument("--desktop", action="store_true", help="a desktop notification when each job ends")
    r.set_defaults(func=cmd_run)
    q.set_defaults(func=lambda args: (q.print_help(), 2)[1])


def _runs_dir(args) -> str:
    return args.runs_dir or DEFAULT_RUNS_DIR


def cmd_add(args, sub) -> int:
    if args.command:
        if args.config or args.set or args.name:
            raise UserError("queue add takes either --config/--set/--name (a training) or a command, not both")
        check_command(sub, args.command)
        runs_dir = _runs_dir(args)
        job = queue_command(args.command, runs_dir)
    else:
        overrides = list(args.set) + ([f"run.name={args.name}"] if args.name else [])
        cfg = resolve_config(args.config, overrides)  # what `train` trains, so the same config is checked
        runs_dir = args.runs_dir or cfg.saving.runs_dir
        job = queue_train(cfg, source=args.config, runs_dir=runs_dir,
                          argv=[*(["--config", args.config] if args.config else []),
                                *[x for o in overrides for x in ("--set", o)]])
    print(f"queued {job.id} ({job.kind} {job.name}) in {_where(runs_dir)}")
    return 0


def _where(runs_dir) -> str:
    """The queue's folder, and the command that runs it when plain `queue run` (./runs) would look elsewhere: a
    training is queued in its config's saving.runs_dir, which need not be the folder `queue run` reads."""
    folder = _resolved(runs_dir)
    run = "python -m trainer queue run" + ("" if folder == _resolved(DEFAULT_RUNS_DIR) else
                                           f" --runs-dir {shlex.quote(folder)}")
    return f"{Path(folder) / 'queue'}; run it: {run}"


def _resolved(runs_dir) -> str:
    argv = runner_argv(runs_dir)  # the public API's absolute form of the folder (expanded ~, resolved)
    return argv[argv.index("--runs-dir") + 1]


def check_command(sub, argv: list[str]) -> None:
    """Parse a queued command with its own parser now; argparse's complaint becomes one UserError line."""
    kinds = [k for k in ("export", "blend", "caption") if k in sub.choices]
    if argv[0] not in kinds:
        raise UserError(f"queue add: {argv[0]!r} cannot be queued; queue a training with --config, or one of: "
                        f"{', '.join(kinds)}")
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            sub.choices[argv[0]].parse_args(argv[1:])
    except SystemExit:
        lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
        raise UserError(f"queue add {argv[0]}: {lines[-1] if lines else 'bad arguments'}") from None


def cmd_list(args) -> int:
    jobs, damaged = list_queue(_runs_dir(args))
    for line in damaged:
        print(f"warning: {line}", file=sys.stderr)
    if not jobs:
        print("the queue is empty" + (" (apart from the damaged files above)" if damaged else ""))
    for n, job in enumerate(jobs, start=1):
        when = time.strftime("%m-%d %H:%M", time.localtime(job.ended_at or job.started_at or job.added_at))
        lane = f" gpus {job.lane}" if job.lane else ""
        print(f"{n:3d}  {job.id}  {job.state:8s} {job.kind:8s} {job.name}{lane}  {when}"
              + (f"  {job.run_dir}" if job.run_dir else "") + (f"\n      {job.message}" if job.message else ""))
    return 0


def cmd_move(args) -> int:
    move_job(_runs_dir(args), args.id, args.to)
    print(f"moved {args.id} to position {args.to} of the queued jobs")
    return 0


def cmd_remove(args) -> int:
    job = remove_job(_runs_dir(args), args.id)
    print(f"removed {job.id} ({job.kind} {job.name})" + (f"; its run folder {job.run_dir} is kept" if job.run_dir
                                                          else ""))
    return 0


def cmd_resume(args) -> int:
    job = resume_job(_runs_dir(args), args.id)
    print(f"queued {job.id} again" + (f"; it resumes {job.run_dir} from its last checkpoint" if job.run_dir else ""))
    return 0


def cmd_stop(args) -> int:
    job = stop_job(_runs_dir(args), args.id)
    print(f"asked {job.id} to stop after its current step; the queue goes on with the next job")
    return 0


def cmd_run(args) -> int:
    return run_queue(_runs_dir(args), gpus=args.gpus, webhooks=args.webhook, desktop=args.desktop)
