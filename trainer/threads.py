"""How many threads a CPU run computes with: the cores other programs leave free when the run starts, kept for the
run and every resume of it.

torch starts one OpenMP thread per core, and its threads wait for each other at the end of every operation. On a
machine whose cores other programs keep busy, the thread that is waited for is off its core for a whole scheduler
slice while the others spin: the tiny model's step, 0.04 CPU-s with one thread, took 10-11 s with two at load 10-18
on 2 cores (bench/bench_threads.py). One thread per free core never waits for a thread that is not running, so a
busy machine slows a run in proportion to its share of the cores.

Why the count is picked once and recorded (precision.cpu_threads in the run's config.toml) instead of following the
load: the thread count changes the last bits of torch's CPU sums (two threads add the halves of a sum in another
order), so a count that changed while a run trains would break the promises that a resumed run equals an
uninterrupted one and that the same config gives the same adapter. OMP_NUM_THREADS, when set, is the count.
Generation (samples aside) promises no bit-exactness, so the Generator asks for the free cores at each call.
"""
from __future__ import annotations

import os


def usable_cores() -> int:
    """The cores this process may run on (a container's or taskset's CPU set, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def free_cores(ours: float = 0.0) -> int:
    """Cores other programs leave free now: the usable cores less the 1-minute load average, which counts every
    runnable thread (`ours`: this process's own, not taken for others'); at least 1."""
    cores = usable_cores()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this system: every core, as torch's default
        return cores
    return max(1, min(cores, round(cores - max(0.0, load - ours))))


def pick_cpu_threads(ours: float = 0.0) -> int:
    """The count a new CPU run records, or a generation uses: OMP_NUM_THREADS when set (the user's, or the tests'),
    else the free cores (`ours`: threads of this process counted in the load)."""
    named = os.environ.get("OMP_NUM_THREADS", "").strip()
    if named.isdigit() and int(named) > 0:
        return int(named)
    return free_cores(ours)


def use_cpu_threads(torch, count: int) -> None:
    """Compute with `count` threads from this thread on (torch's count is the calling thread's: OpenMP's setting);
    0 leaves torch's default (a run recorded before the count was)."""
    if count > 0 and torch.get_num_threads() != count:
        torch.set_num_threads(count)
