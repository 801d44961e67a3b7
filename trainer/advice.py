"""What to try when a run fails: the one copy of each piece of advice the loop, the CLI and the app show.
Stdlib only (the app reads it for a failed run without loading torch)."""
from __future__ import annotations


def nan_advice(cfg) -> str:
    tips = ["lower optimizer.unet_lr (and text_encoder_lr)", "lower network.alpha"]
    if cfg.precision.mixed == "fp16":
        tips.insert(0, "use precision.mixed=bf16 (fp16 overflows on some cards) or no")
    return "Try: " + "; ".join(tips) + "."


def oom_advice(device: str = "cuda") -> str:
    if device == "cpu":
        return ("Out of CPU memory (RAM). Try: lower dataset.batch_size or dataset.resolution; turn on "
                "precision.gradient_checkpointing; dataset.cache_latents=disk instead of memory; precision.mixed=bf16; "
                "close other programs.")
    return ("Out of memory. Try: lower dataset.batch_size or dataset.resolution; turn on "
            "precision.gradient_checkpointing; keep dataset.cache_latents on (memory or disk); use "
            "optimizer.name=adamw8bit on CUDA; precision.mixed=fp16 or bf16.")


CPU_OOM_MARKERS = ("DefaultCPUAllocator: can't allocate memory", "not enough memory", "Cannot allocate memory")
FILE_IN_THE_WAY = "A file stands where a folder is needed: rename or remove it, or choose another folder."

DISK_MARKERS = {"No space left on device": "The disk is full: free space there, or set saving.runs_dir (and "
                                           "dataset.cache_dir) to a disk with room; the checkpoints already "
                                           "written are kept and the run can be resumed.",
                "Read-only file system": "That folder cannot be written: choose a writable saving.runs_dir (or "
                                         "dataset.cache_dir).",
                "Permission denied": "loradesk may not write there: choose a folder you own for saving.runs_dir "
                                     "(or dataset.cache_dir), or fix its permissions.",
                "File exists": FILE_IN_THE_WAY, "Not a directory": FILE_IN_THE_WAY}


def is_cpu_oom(error: str) -> bool:
    return any(marker in error for marker in CPU_OOM_MARKERS)


def advice_for(error: str) -> str:
    """Advice for an error message written without any (out of memory, a full or read-only disk, raised outside
    the loop's own checks)."""
    if is_cpu_oom(error):
        return oom_advice("cpu")
    if "out of memory" in error.lower():
        return oom_advice()
    return next((tip for marker, tip in DISK_MARKERS.items() if marker in error), "")


def os_error_message(err: OSError) -> str:
    """One line for a file the OS would not let us write: which file, the OS's words (no "[Errno 30]") and the
    fix."""
    words = err.strerror or str(err)
    tip = advice_for(words)
    where = f"cannot write {err.filename}: " if err.filename else ""
    return f"{where}{words}" + (f". {tip}" if tip else "")
