"""Issue 15: the fault campaign as a test. A run is killed with SIGKILL again and again (once inside a checkpoint
write, the other times at random moments of training, from a fixed seed), resumed each time as the CLI resumes,
and must end with an adapter equal to an uninterrupted run's, bit for bit."""
from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

from test_training import make_cfg
from trainer import runs
from trainer.job import child_env

ROOT = Path(__file__).resolve().parent.parent

# The trainer as `python -m trainer train --resume` runs it; with a kill switch inside the N-th checkpoint write
# (after its files are written, before its manifest and the rename), the worst moment for a crash.
CHILD = r"""
import os, signal, sys
from pathlib import Path
from trainer import check_resumable, run_here, runs
run_dir, kill_at = Path(sys.argv[1]), int(sys.argv[2])
if kill_at:
    real, calls = runs.write_json_atomic, {"n": 0}
    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    runs.write_json_atomic = dying
resume = bool(runs.checkpoint_dirs(run_dir)) or any(run_dir.joinpath("checkpoints").glob(".*"))
if resume:
    check_resumable(run_dir)
sys.exit(run_here(run_dir, resume=resume))
"""


def start(run_dir: Path, kill_at: int = 0) -> subprocess.Popen:
    # One thread each: with several, MKL may use fewer threads while the machine is busy, and a different
    # summation order changes the last bits (bit-exactness holds for a fixed thread count, not across them)
    env = {**child_env(), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MKL_DYNAMIC": "FALSE"}
    return subprocess.Popen([sys.executable, "-c", CHILD, str(run_dir), str(kill_at)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=str(ROOT))


def last_step(run_dir: Path) -> int:
    step = 0
    for line in (run_dir / "events.jsonl").read_bytes().splitlines() if (run_dir / "events.jsonl").exists() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line torn by a kill
        if record.get("type") == "progress":
            step = record["step"]
    return step


def wait_for_training(process: subprocess.Popen, run_dir: Path, after: int, timeout: float = 120.0) -> bool:
    """True once the attempt trained past step `after`; False if it ended first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and process.poll() is None:
        if last_step(run_dir) > after:
            return True
        time.sleep(0.02)
    return process.poll() is None


def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(tiny_model_dir, image_dir, tmp_path):
    cfg = make_cfg(tiny_model_dir, image_dir, tmp_path, **{
        "schedule.max_steps": 40, "saving.every_n_steps": 4, "saving.keep_last": 2, "schedule.lr_scheduler": "cosine",
        "dataset.flip": True, "dataset.crop": "random", "network.dropout": 0.1})
    uninterrupted = runs.create_run_dir(cfg)
    assert start(uninterrupted).wait(300) == 0
    reference = runs.run_info(uninterrupted).adapter_path

    run_dir = runs.create_run_dir(cfg)
    first = start(run_dir, kill_at=2)  # dies inside its second checkpoint write (step 8)
    assert first.wait(180) == -signal.SIGKILL, first.stderr.read().decode()[-2000:]
    assert any(p.name.endswith(".tmp") for p in (run_dir / "checkpoints").iterdir()), "killed mid-write"
    kills, rng = 1, random.Random(15)
    while kills < 6:
        process = start(run_dir)
        if not wait_for_training(process, run_dir, after=last_step(run_dir)):
            break  # it finished before the kill came
        time.sleep(rng.uniform(0.0, 0.8))
        if process.poll() is None:
            process.kill()
            kills += 1
        assert process.wait(60) in (0, -signal.SIGKILL), process.stderr.read().decode()[-2000:]
    final = start(run_dir)
    assert final.wait(300) == 0, final.stderr.read().decode()[-2000:]
    assert kills >= 5
    info = runs.run_info(run_dir)
    assert info.state == "finished" and info.step == 40
    want, got = load_file(str(reference)), load_file(str(info.adapter_path))
    assert want.keys() == got.keys()
    assert all(want[k].numpy().tobytes() == got[k].numpy().tobytes() for k in want)
    leftovers = [p.name for p in run_dir.rglob(".*") if p.name.endswith((".tmp", ".old"))]
    assert leftovers == []
