"""Issue 23 item 21: a CPU training on a busy machine computes with the cores other programs leave free.

With torch's default (one thread per core) a training at load 18 on 2 cores ran 10.1 s/step against ~0.2 CPU-s/step
with one thread: the threads wait for each other while the one they wait for is off its core. The count is picked
when the run starts and recorded in its config.toml (precision.cpu_threads), so a resume computes with the same
count: the count changes the last bits of sums. The speed itself is measured in bench/bench_threads.py, not here."""
from __future__ import annotations

import os

import pytest
import torch

from trainer import load_run_config, list_runs
from trainer.__main__ import main


@pytest.fixture
def two_cores(monkeypatch):
    """A 2-core machine with torch's default threads and no OMP_NUM_THREADS (the tests' conftest sets one);
    records every thread count the trainer sets, and leaves the tests' thread count afterwards."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    before, set_counts = torch.get_num_threads(), []
    real = torch.set_num_threads

    def recording(n):
        set_counts.append(n)
        real(n)
    monkeypatch.setattr(torch, "set_num_threads", recording)
    real(2)
    yield set_counts
    real(before)


def load(monkeypatch, value: float) -> None:
    monkeypatch.setattr(os, "getloadavg", lambda: (value, value, value))


def train_tiny(tiny_model_dir, image_dir, tmp_path, *extra: str, resume: str | None = None) -> None:
    args = ["train", "--quiet"] + (["--resume", resume] if resume else [])
    for item in [f"model.path={tiny_model_dir}", f"dataset.path={image_dir}", f"saving.runs_dir={tmp_path / 'runs'}",
                 "dataset.resolution=32", "network.rank=2", "schedule.max_steps=2", "precision.device=cpu",
                 *extra]:
        if not resume or item.startswith("schedule."):
            args += ["--set", item]
    assert main(args) == 0


def recorded(tmp_path) -> int:
    return load_run_config(list_runs(tmp_path / "runs")[0].run_dir).precision.cpu_threads


def test_a_cpu_training_on_a_busy_machine_uses_one_thread(tiny_model_dir, image_dir, tmp_path, monkeypatch,
                                                          two_cores):
    load(monkeypatch, 18.0)
    train_tiny(tiny_model_dir, image_dir, tmp_path)
    assert recorded(tmp_path) == 1 and two_cores == [1] and torch.get_num_threads() == 1, two_cores


def test_on_an_idle_machine_it_keeps_every_core(tiny_model_dir, image_dir, tmp_path, monkeypatch, two_cores):
    load(monkeypatch, 0.2)
    train_tiny(tiny_model_dir, image_dir, tmp_path)
    assert recorded(tmp_path) == 2 and set(two_cores) <= {2} and torch.get_num_threads() == 2


def test_omp_num_threads_is_the_count(tiny_model_dir, image_dir, tmp_path, monkeypatch, two_cores):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    load(monkeypatch, 18.0)
    train_tiny(tiny_model_dir, image_dir, tmp_path)
    assert recorded(tmp_path) == 2 and torch.get_num_threads() == 2


def test_a_resume_computes_with_the_count_the_run_started_with(tiny_model_dir, image_dir, tmp_path, monkeypatch,
                                                                two_cores):
    """Started busy (1 thread), resumed on an idle machine: still 1 thread, so the resumed run equals an
    uninterrupted one bit for bit (the count changes the last bits of sums)."""
    load(monkeypatch, 18.0)
    train_tiny(tiny_model_dir, image_dir, tmp_path)
    load(monkeypatch, 0.0)
    torch.set_num_threads(2)  # what a fresh process on the idle machine starts with
    run_dir = list_runs(tmp_path / "runs")[0].run_dir
    train_tiny(tiny_model_dir, image_dir, tmp_path, "schedule.max_steps=4", resume=str(run_dir))
    assert torch.get_num_threads() == 1 and recorded(tmp_path) == 1, two_cores


def test_generation_on_the_cpu_asks_for_the_free_cores(monkeypatch):
    from trainer.threads import pick_cpu_threads
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    load(monkeypatch, 2.0)
    assert pick_cpu_threads(ours=2) == 2, "its own two threads are not others' load"
    load(monkeypatch, 7.0)
    assert pick_cpu_threads(ours=2) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert pick_cpu_threads(ours=2) == 3
