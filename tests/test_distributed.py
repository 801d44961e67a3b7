"""Issue 16: data-parallel training over several processes (CPU processes over gloo here, as on GPUs over NCCL)."""
from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tiny import make_images, wait_for
from trainer import config as C
from trainer import runs
from trainer.__main__ import main
from trainer.distributed import dead_process, launch_command, share
from trainer.events import Failed, Finished, Progress, Started, read_events
from trainer.job import JobError, check_resumable, start_run

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def eight(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("dp") / "eight", n=8)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sets(model, data, runs_dir, name, *extra) -> list[str]:
    out = []
    for item in [f"model.path={model}", f"dataset.path={data}", f"saving.runs_dir={runs_dir}", f"run.name={name}",
                 "dataset.resolution=32", "network.rank=4", "network.alpha=4", "schedule.max_steps=4",
                 "saving.dtype=fp32", "precision.device=cpu", "optimizer.unet_lr=1e-2", "dataset.flip=true",
                 "loss.noise_offset=0.05", "optimizer.eps=1e-4", f"distributed.main_port={free_port()}", *extra]:
        out += ["--set", item]
    return out


def train(model, data, runs_dir, name, processes, *extra) -> Path:
    assert main(["train", "--quiet", "--num-processes", str(processes),
                 *sets(model, data, runs_dir, name, *extra)]) == 0
    return next(p for p in Path(runs_dir).iterdir() if p.name.startswith(name + "-"))


def assert_close(a: Path, b: Path, rel: float = 1e-5) -> None:
    """The adapters within `rel` of each other: ||a - b|| / ||b|| over the whole adapter, and each tensor within
    10 x rel of its own norm. Not bit for bit: a batch of 4 and two of 2 round differently in the last bit, and the
    text encoders' gradients (sums with much cancellation) carry that up to about 1e-5 of a tensor's norm.
    (optimizer.eps is 1e-4 in these runs: with AdamW's 1e-8, the update g / (|g| + eps) of a gradient element
    near eps turns last-bit differences into 1e-4 relative ones, whether the batch is split or not.)"""
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    whole = sum(((x[k] - y[k]) ** 2).sum() for k in x) / sum((y[k] ** 2).sum() for k in x)
    worst = max(((x[k] - y[k]).norm() / y[k].norm().clamp_min(1e-30)).item() for k in x)
    print(f"{a.name} vs {b.name}: {whole.sqrt().item():.2e} of the adapter's norm, worst tensor {worst:.2e}")
    assert whole.sqrt() < rel, f"{whole.sqrt().item():.2e} of the adapter's norm"
    for k in x:
        assert (x[k] - y[k]).norm() <= 10 * rel * y[k].norm(), k


@pytest.fixture(scope="module")
def pair(tiny_model_dir, eight, tmp_path_factory):
    """One process with batch_size 4 against two with batch_size 2: the same global batch of 4."""
    root = tmp_path_factory.mktemp("pair")
    one = train(tiny_model_dir, eight, root / "runs", "one", 1, "dataset.batch_size=4")
    two = train(tiny_model_dir, eight, root / "runs", "two", 2, "dataset.batch_size=2")
    return one, two


def test_two_processes_train_the_adapter_one_process_trains(pair):
    one, two = pair
    assert_close(runs.final_adapter_path(two, runs.load_run_config(two)),
                 runs.final_adapter_path(one, runs.load_run_config(one)))
    trained = load_file(str(two / "two.safetensors"))
    assert any(v.abs().max() > 0 for k, v in trained.items() if "lora_up" in k), "B left zero: it trained"


def test_and_with_gradient_accumulation_and_lora_dropout(tiny_model_dir, eight, tmp_path):
    """Each image's LoRA dropout mask comes from (seed, batch, its position, the layer), like its noise."""
    one = train(tiny_model_dir, eight, tmp_path / "runs", "one", 1, "dataset.batch_size=2",
                "schedule.gradient_accumulation=2", "network.dropout=0.3")
    two = train(tiny_model_dir, eight, tmp_path / "runs", "two", 2, "dataset.batch_size=1",
                "schedule.gradient_accumulation=2", "network.dropout=0.3")
    assert_close(two / "two.safetensors", one / "one.safetensors")


def test_only_the_main_process_writes(pair):
    from test_interop import load_into_stock_pipeline
    _, two = pair
    assert sorted(p.name for p in two.iterdir()) == [".trainer.lock", "checkpoints", "config.toml", "events.jsonl",
                                                     "train.log", "two.safetensors"]
    assert [p.name for p in (two / "checkpoints").iterdir()] == ["step-000004"]
    events = read_events(two / "events.jsonl")
    started = [e for e in events if isinstance(e, Started)]
    assert len(started) == 1 and started[0].world_size == 2 and started[0].global_batch == 4
    progress = [e for e in events if isinstance(e, Progress)]
    assert [e.step for e in progress] == [1, 2, 3, 4], "one writer: each step once"
    assert all(e.images_per_s > 0 for e in progress)
    assert [e.kind for e in events][-1] == "finished"
    from safetensors import safe_open
    with safe_open(str(two / "two.safetensors"), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_batch_size_per_device"], meta["ss_total_batch_size"]) == ("2", "4")
    load_into_stock_pipeline(two / "two.safetensors")
    from app import runview as V
    assert "2 processes, 4 images per step" in V.status_text(V.run_view(two)), "the run view shows the world size"


def test_shares_are_disjoint_and_cover_the_batch():
    for n in range(0, 7):
        for world in (1, 2, 3):
            cuts = [share(list(range(n)), r, world) for r in range(world)]
            assert cuts[0][0] == 0 and cuts[-1][1] == n and all(a[1] == b[0] for a, b in zip(cuts, cuts[1:]))


def test_the_command_line_for_several_machines():
    cfg = C.TrainConfig()
    for key, value in {"distributed.processes": 4, "distributed.machines": 3, "distributed.machine_rank": 2,
                       "distributed.main_address": "10.0.0.5", "distributed.main_port": 29600}.items():
        C.set_value(cfg, key, value)
    assert C.validate(cfg, check_paths=False) == []
    cmd = launch_command(cfg, "/runs/x", resume=True)
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    flags = dict(zip(cmd[3:-4:2], cmd[4:-4:2]))
    assert flags == {"--nproc-per-node": "4", "--nnodes": "3", "--node-rank": "2", "--master-addr": "10.0.0.5",
                     "--master-port": "29600", "--max-restarts": "0"}
    assert cmd[-4:] == ["-m", "trainer.job", str(Path("/runs/x").resolve()), "--resume"]
    C.set_value(cfg, "distributed.machines", 1)
    single = launch_command(cfg, "/runs/x")
    assert "--standalone" in single and "--master-port" not in single, "one machine: torchrun picks a free port"
    C.set_value(cfg, "distributed.machines", 3)
    C.set_value(cfg, "distributed.machine_rank", 3)
    C.set_value(cfg, "distributed.gpus", "0,1")
    problems = C.validate(cfg, check_paths=False)
    assert any("machine_rank is 3, but there are 3 machines" in p for p in problems)
    assert any("names 2 GPUs for 4 processes" in p for p in problems)


def test_a_dead_process_is_named():
    summary = ("Failures:\n[1]:\n  time      : 2026-12-02_04:05:10\n  host      : box\n"
               "  rank      : 0 (local_rank: 0)\n"
               "  exitcode  : 1 (pid: 4241)\n------\nRoot Cause (first observed failure):\n[0]:\n"
               "  time      : 2026-12-02_04:05:08\n  host      : box\n  rank      : 1 (local_rank: 1)\n"
               "  exitcode  : -9 (pid: 4242)  (SIGKILL)\n")
    assert dead_process(summary) == "training process 1 died (signal 9, SIGKILL)"
    assert dead_process("nothing useful") == ""


def steps_done(run_dir: Path) -> int:
    return max([e.step for e in read_events(run_dir / "events.jsonl") if isinstance(e, Progress)], default=0)


def start(model, data, runs_dir, name, *extra):
    cfg = C.apply_overrides(C.TrainConfig(), [s for s in sets(model, data, runs_dir, name, "dataset.batch_size=2",
                                                             "distributed.processes=2", *extra) if s != "--set"])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return start_run(cfg, env=env)


def test_stop_during_a_two_process_run_then_resume(tiny_model_dir, eight, tmp_path):
    job = start(tiny_model_dir, eight, tmp_path / "runs", "stopped", "schedule.max_steps=400",
                "saving.every_n_steps=1000")
    wait_for(lambda: steps_done(job.run_dir) >= 2, 120, "two steps")
    from trainer.events import CheckpointWritten, send_command
    send_command(job.run_dir, "save")  # one writer: process 0 alone writes it
    wait_for(lambda: [e for e in read_events(job.run_dir / "events.jsonl") if isinstance(e, CheckpointWritten)],
             60, "the checkpoint asked for")
    job.stop()
    assert job.wait(90) == 0
    finished = read_events(job.run_dir / "events.jsonl")[-1]
    assert isinstance(finished, Finished) and finished.stopped and Path(finished.adapter_path).is_file()
    stopped_at = finished.step
    assert stopped_at < 400 and runs.last_checkpoint(job.run_dir).name == f"step-{stopped_at:06d}"
    check_resumable(job.run_dir, ["schedule.max_steps=" + str(stopped_at + 2)])
    assert main(["train", "--quiet", "--resume", str(job.run_dir)]) == 0
    assert runs.run_info(job.run_dir).step == stopped_at + 2
    whole = train(tiny_model_dir, eight, tmp_path / "runs", "whole", 2, "dataset.batch_size=2",
                  f"schedule.max_steps={stopped_at + 2}")
    assert_close(job.run_dir / "stopped.safetensors", whole / "whole.safetensors")  # resumed = uninterrupted


def test_ctrl_c_stops_every_process_after_the_same_step(tiny_model_dir, eight, tmp_path):
    import subprocess
    import sys
    from trainer.job import child_env
    cmd = [sys.executable, "-m", "trainer", "train", "--quiet", "--num-processes", "2",
           *sets(tiny_model_dir, eight, tmp_path / "runs", "ctrlc", "dataset.batch_size=2", "schedule.max_steps=400")]
    cli = subprocess.Popen(cmd, env=child_env(dict(os.environ, OMP_NUM_THREADS="1")), stderr=subprocess.PIPE,
                           text=True)
    run_dir = wait_for(lambda: next((tmp_path / "runs").glob("ctrlc-*"), None), 60, "the run folder")
    wait_for(lambda: steps_done(run_dir) >= 2, 120, "two steps")
    cli.send_signal(signal.SIGINT)
    _, err = cli.communicate(timeout=90)
    assert cli.returncode == 0, err
    assert "stopping every process after this step" in err and "Traceback" not in err
    last = read_events(run_dir / "events.jsonl")[-1]
    assert isinstance(last, Finished) and last.stopped and Path(last.adapter_path).is_file()


def test_a_second_ctrl_c_aborts_every_process_at_once(tiny_model_dir, eight, tmp_path):
    """The first Ctrl+C stops after the step and writes the adapter; a second aborts: no process finishes its step
    or writes an adapter, the last checkpoint is kept, and the run resumes."""
    import subprocess
    import sys
    from trainer.job import child_env
    cmd = [sys.executable, "-m", "trainer", "train", "--quiet", "--num-processes", "2",
           *sets(tiny_model_dir, eight, tmp_path / "runs", "abort", "dataset.batch_size=2", "schedule.max_steps=400",
                 "saving.every_n_steps=2")]
    # each loss 1 s slower: the second Ctrl+C lands inside the step the first one let finish
    cli = subprocess.Popen(cmd, env=child_env(hooked(tmp_path, slow=1)), stderr=subprocess.PIPE, text=True)
    run_dir = wait_for(lambda: next((tmp_path / "runs").glob("abort-*"), None), 60, "the run folder")
    wait_for(lambda: runs.last_checkpoint(run_dir), 120, "a checkpoint")
    cli.send_signal(signal.SIGINT)
    said = cli.stderr.readline() + cli.stderr.readline()  # the launcher has heard the first (two at once are one)
    cli.send_signal(signal.SIGINT)
    second = time.monotonic()
    _, err = cli.communicate(timeout=90)
    print(f"every process had ended {time.monotonic() - second:.1f} s after the second Ctrl+C")
    err = said + err
    assert cli.returncode == 130, err
    assert "aborted" in err and "resume" in err and "Traceback" not in err
    assert not launch_pids(run_dir.resolve()), "no process left"
    assert not (run_dir / "abort.safetensors").exists(), "aborted: no process went on to write the adapter"
    info = runs.run_info(run_dir)
    assert info.state == "stopped", info
    assert main(["train", "--quiet", "--resume", str(run_dir), "--set", f"schedule.max_steps={info.step + 1}"]) == 0


def launch_pids(run_dir: Path) -> list[int]:
    """torchrun's and the training processes' pids of a run (their command lines name its folder)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes() if proc.name.isdigit() else b""
        except OSError:
            continue
        if b"trainer.job" in cmd and str(run_dir).encode() in cmd:
            found.append(int(proc.name))
    return found


def worker_pid(run_dir: Path, rank: int) -> int | None:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"TORCHELASTIC_RUN_ID" in b" ".join(env) and \
                str(run_dir).encode() in cmd:
            return int(proc.name)
    return None


def test_kill_9_of_a_worker_fails_the_run_and_it_resumes(tiny_model_dir, eight, tmp_path):
    """The survivor does not sit out its collective timeout (30 minutes here): torchrun sees process 1 die and
    ends the run, which the events say. (No time is asserted: a busy machine may take long to get there.)"""
    job = start(tiny_model_dir, eight, tmp_path / "runs", "killed", "schedule.max_steps=400",
                "saving.every_n_steps=2")
    wait_for(lambda: runs.last_checkpoint(job.run_dir), 120, "a checkpoint")
    pid = wait_for(lambda: worker_pid(job.run_dir.resolve(), 1), 30, "process 1")
    os.kill(pid, signal.SIGKILL)
    code = job.wait(900)  # a guard against a hang far below the 30-minute collective timeout, not a measurement
    assert code != 0
    assert worker_pid(job.run_dir.resolve(), 0) is None, "no process left behind"
    failed = read_events(job.run_dir / "events.jsonl")[-1]
    assert isinstance(failed, Failed) and "training process 1 died (signal 9, SIGKILL)" in failed.error
    info = runs.run_info(job.run_dir)
    assert info.state == "failed" and "training process 1 died" in info.error, "what the app and the CLI show"
    assert sum(isinstance(e, Failed) for e in read_events(job.run_dir / "events.jsonl")) == 1
    step = runs.last_checkpoint(job.run_dir).name
    with pytest.raises(JobError, match="changes the global batch from 4 to 2"):
        check_resumable(job.run_dir, ["distributed.processes=1"])
    check_resumable(job.run_dir, ["distributed.processes=1", "dataset.batch_size=4",
                                  f"schedule.max_steps={int(step.split('-')[1]) + 2}"])
    assert main(["train", "--quiet", "--resume", str(job.run_dir)]) == 0, "resumed in one process, same global batch"
    assert runs.run_info(job.run_dir).state == "finished"


def test_a_killed_launcher_leaves_no_process_and_loses_nothing(tiny_model_dir, eight, tmp_path):
    """The launcher (the app's trainer child, or the CLI) held the run's lock; killed with -9, torchrun and the
    processes would train on with nobody holding it, so the app would offer a resume of a run still training.
    Process 0 notices the free lock, takes it, and the run stops after the step, adapter written."""
    job = start(tiny_model_dir, eight, tmp_path / "runs", "orphan", "schedule.max_steps=400",
                "saving.every_n_steps=1000")
    wait_for(lambda: steps_done(job.run_dir) >= 2, 120, "two steps")
    job.process.kill()
    job.process.wait(10)  # the launcher is gone, and with it its hold of the lock
    killed_at = time.monotonic()
    assert runs.run_info(job.run_dir).state == "running", "torchrun holds the run's lock: no resume is offered"
    wait_for(lambda: not launch_pids(job.run_dir.resolve()), 60, "every process (torchrun too) to end")
    print(f"every process ended {time.monotonic() - killed_at:.1f} s after the launcher was killed")
    events = read_events(job.run_dir / "events.jsonl")
    assert isinstance(events[-1], Finished) and events[-1].stopped and Path(events[-1].adapter_path).is_file()
    assert any("launcher" in getattr(e, "text", "") for e in events), "the run says why it stopped"
    # the lock drops as the last process's files close, a moment after /proc stops listing its command line
    assert wait_for(lambda: runs.run_info(job.run_dir).state != "running", 30, "the lock to drop") and \
        runs.run_info(job.run_dir).state == "stopped"
    assert main(["train", "--quiet", "--resume", str(job.run_dir),
                 "--set", f"schedule.max_steps={events[-1].step + 1}"]) == 0


def test_a_killed_torchrun_leaves_the_run_locked_until_its_processes_end(tiny_model_dir, eight, tmp_path):
    """torchrun killed alone: the launcher reports and exits, while the processes (each in its own session)
    train on. Process 0 takes the run's lock the moment nobody else holds it, so the app never offers a resume
    of a run that still trains; it stops every process after the step, adapter written."""
    cfg = config(tiny_model_dir, eight, tmp_path / "runs", "agent", "dataset.batch_size=2", "distributed.processes=2",
                 "schedule.max_steps=400", "saving.every_n_steps=1000")
    job = start_run(cfg, env=hooked(tmp_path, slow=1))
    wait_for(lambda: steps_done(job.run_dir) >= 1, 120, "a step")
    agent = next(p for p in launch_pids(job.run_dir.resolve()) if b"torch.distributed.run" in
                 Path(f"/proc/{p}/cmdline").read_bytes())
    os.kill(agent, signal.SIGKILL)
    states, deadline = [], time.monotonic() + 90
    while launch_pids(job.run_dir.resolve()) and time.monotonic() < deadline:
        states.append(runs.run_info(job.run_dir).state)
        time.sleep(0.05)
    assert not launch_pids(job.run_dir.resolve()), "every process ended"
    assert job.wait(1) == 0, "the launcher waited for its processes and reports how the run ended"
    assert states and set(states) <= {"running", "stopped"}, sorted(set(states))
    last = read_events(job.run_dir / "events.jsonl")[-1]
    assert isinstance(last, Finished) and last.stopped and Path(last.adapter_path).is_file()
    # the lock drops as the last process's files close, a moment after /proc stops listing its command line (seen
    # once in CI: 'running' read in between), as in the killed-launcher test above
    assert wait_for(lambda: runs.run_info(job.run_dir).state != "running", 30, "the lock to drop") and \
        runs.run_info(job.run_dir).state == "stopped"


def test_the_gpu_check_says_so_without_cuda():
    import subprocess
    import sys
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, str(root / "bench" / "gpu_check.py")], capture_output=True, text=True,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert done.returncode == 0 and "no CUDA device here" in done.stdout, done.stderr[-2000:]


OUTSIDE_LAUNCHERS = {
    "torchrun": lambda port: ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port)],
    # the GPU command; on a machine without CUDA accelerate's --multi_gpu still starts torchrun's launcher
    # and the processes meet over gloo (precision.device=cpu), so the very command line runs here
    "accelerate": lambda port: ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                                "--main_process_port", str(port)],
}


@pytest.mark.parametrize("launcher", list(OUTSIDE_LAUNCHERS))
def test_an_outside_launcher_runs_the_cli_in_every_process(tiny_model_dir, eight, tmp_path, launcher):
    """`accelerate launch --multi_gpu --num_processes N -m trainer train ...` and `torchrun ... -m trainer train`:
    each process runs the CLI; process 0 makes the one run folder and the others train in it."""
    import subprocess
    import sys
    from trainer.job import child_env
    cmd = [sys.executable, *OUTSIDE_LAUNCHERS[launcher](free_port()), "-m", "trainer", "train", "--quiet",
           *sets(tiny_model_dir, eight, tmp_path / "runs", "outside", "dataset.batch_size=2")]
    done = subprocess.run(cmd, env=child_env(dict(os.environ, OMP_NUM_THREADS="1")), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir, = (tmp_path / "runs").iterdir()
    started = [e for e in read_events(run_dir / "events.jsonl") if isinstance(e, Started)]
    assert len(started) == 1 and started[0].world_size == 2 and runs.run_info(run_dir).state == "finished"
    assert runs.load_run_config(run_dir).distributed.processes == 2, "the config says how the run was trained"
    assert done.stdout.count("adapter: ") == 1, "process 0 reports"


# Test-only faults and probes, injected from outside the product code: site imports sitecustomize in every Python
# process started with its folder on PYTHONPATH; only the training processes (RANK set) act on it. RECORD: each
# process writes its CUDA_VISIBLE_DEVICES and its process group's timeout; SLOW: every loss takes that many seconds
# longer; NAN_AT: process 1's loss turns NaN from its NAN_AT-th micro-batch on (process 0's stays finite).
HOOK = """
import os, time
env = os.environ
if "RANK" in env and env.get("LORADESK_TEST_RECORD"):
    with open(env["LORADESK_TEST_RECORD"] + "-" + env["RANK"] + ".gpus", "w") as f:
        f.write(env.get("CUDA_VISIBLE_DEVICES", "<unset>"))
    import torch.distributed as dist
    real_init = dist.init_process_group
    def recording(*args, **kwargs):
        with open(env["LORADESK_TEST_RECORD"] + "-" + env["RANK"] + ".timeout", "w") as f:
            f.write(str(kwargs["timeout"].total_seconds()))
        return real_init(*args, **kwargs)
    dist.init_process_group = recording
if "RANK" in env and (env.get("LORADESK_TEST_SLOW") or (env["RANK"] == "1" and env.get("LORADESK_TEST_NAN_AT"))):
    import trainer.loop as loop
    real, calls = loop.diffusion_loss, {"n": 0}
    nan_at = int(env.get("LORADESK_TEST_NAN_AT", "0")) if env["RANK"] == "1" else 0
    def faulty(*args, **kwargs):
        time.sleep(float(env.get("LORADESK_TEST_SLOW", "0")))
        losses = real(*args, **kwargs)
        calls["n"] += 1
        return losses * float("nan") if nan_at and calls["n"] >= nan_at else losses
    loop.diffusion_loss = faulty
"""


def hooked(tmp_path: Path, **variables) -> dict:
    """An environment whose Python processes load HOOK, with LORADESK_TEST_<name> for each keyword."""
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(HOOK)
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(hook),
                **{f"LORADESK_TEST_{k.upper()}": str(v) for k, v in variables.items()})


def config(model, data, runs_dir, name, *extra) -> C.TrainConfig:
    return C.apply_overrides(C.TrainConfig(), [s for s in sets(model, data, runs_dir, name, *extra) if s != "--set"])


def test_a_nan_on_one_process_stops_every_process_at_that_step(tiny_model_dir, eight, tmp_path):
    """Process 1 alone sees a NaN loss: the step's loss is all-reduced before the check, so process 0 stops at the
    same step (before its optimizer step), says so once, and the last good checkpoint is a usable adapter."""
    from trainer import load_adapter
    cfg = config(tiny_model_dir, eight, tmp_path / "runs", "nan1", "dataset.batch_size=2", "distributed.processes=2",
                 "schedule.max_steps=40", "saving.every_n_steps=2")
    job = start_run(cfg, env=hooked(tmp_path, nan_at=3))
    assert job.wait(240) == 1
    events = read_events(job.run_dir / "events.jsonl")
    failures = [e for e in events if isinstance(e, Failed)]
    assert len(failures) == 1 and "the loss became nan at step 3" in failures[0].error, failures
    assert failures[0].error.startswith("the loss became"), "process 0 saw the NaN itself (not a peer's death)"
    assert "step-000002" in failures[0].error, "the last good checkpoint is named"
    assert steps_done(job.run_dir) == 2, "no process trained step 3"
    assert worker_pid(job.run_dir.resolve(), 0) is None and worker_pid(job.run_dir.resolve(), 1) is None
    log = (job.run_dir / "train.log").read_text(errors="replace")
    assert "loradesk process 1 failed: the loss became nan at step 3" in log, "process 1 saw the same value"
    adapter = load_adapter(runs.last_checkpoint(job.run_dir))
    assert adapter.layers and all(x.down.isfinite().all() and x.up.isfinite().all() and x.up.abs().sum() > 0
                                  for x in adapter.layers.values()), "the kept checkpoint is a trained adapter"


def test_every_process_waits_distributed_timeout_minutes_for_the_others(tiny_model_dir, eight, tmp_path):
    cfg = config(tiny_model_dir, eight, tmp_path / "runs", "wait", "dataset.batch_size=2", "distributed.processes=2",
                 "schedule.max_steps=1", "distributed.timeout_minutes=45")
    record = tmp_path / "record"
    assert start_run(cfg, env=hooked(tmp_path, record=record)).wait(240) == 0
    assert [float(Path(f"{record}-{rank}.timeout").read_text()) for rank in (0, 1)] == [45 * 60.0] * 2


def test_one_process_on_a_picked_gpu_gets_it(tiny_model_dir, eight, tmp_path):
    """distributed.gpus=1 with one process: CUDA_VISIBLE_DEVICES is what puts it there, so that run starts
    through the launcher too (the training itself runs on the CPU here)."""
    cfg = config(tiny_model_dir, eight, tmp_path / "runs", "gpu1", "distributed.gpus=1", "schedule.max_steps=1")
    record = tmp_path / "record"
    assert start_run(cfg, env=hooked(tmp_path, record=record)).wait(240) == 0
    assert Path(f"{record}-0.gpus").read_text() == "1"


def test_picked_gpus_are_numbered_within_an_inherited_cuda_visible_devices():
    from trainer.distributed import launch_env
    cfg = C.apply_overrides(C.TrainConfig(), ["distributed.processes=2", "distributed.gpus=1,3"])
    assert launch_env(cfg, {"CUDA_VISIBLE_DEVICES": "4,5,6,7"})["CUDA_VISIBLE_DEVICES"] == "5,7"
    assert launch_env(cfg, {})["CUDA_VISIBLE_DEVICES"] == "1,3"
    two = C.apply_overrides(C.TrainConfig(), ["distributed.processes=2"])
    assert launch_env(two, {"CUDA_VISIBLE_DEVICES": "4,5"})["CUDA_VISIBLE_DEVICES"] == "4,5", "left as it is"


def test_a_diverging_loss_stops_every_process_with_one_message(tiny_model_dir, eight, tmp_path, capsys):
    """The step's loss is all-reduced before the NaN check: every process sees the same value and stops at the
    same step; process 0 says why, and the launcher adds nothing."""
    code = main(["train", "--quiet", "--num-processes", "2",
                 *sets(tiny_model_dir, eight, tmp_path / "runs", "diverge", "dataset.batch_size=2",
                       "optimizer.unet_lr=1e30", "optimizer.text_encoder_lr=1e30", "optimizer.eps=1e-30",
                       "optimizer.max_grad_norm=0", "schedule.max_steps=30")])
    err = capsys.readouterr().err
    assert (tmp_path / "runs").is_dir(), err
    run_dir, = (tmp_path / "runs").iterdir()
    failures = [e for e in read_events(run_dir / "events.jsonl") if isinstance(e, Failed)]
    assert code == 1 and len(failures) == 1 and "the loss became" in failures[0].error, failures
    assert "training failed: the loss became" in err and "Traceback" not in err
    assert worker_pid(run_dir.resolve(), 1) is None and worker_pid(run_dir.resolve(), 0) is None
