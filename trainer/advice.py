"""What to try when a run fails: the one copy of each piece of advice the loop, the CLI and the app show.
Stdlib only (the app reads it for a failed run without loading torch)."""
from __future__ import annotations


def nan_advice(cfg) -> str:
    tips = ["lower optimizer.unet_lr (and text_encoder_lr)", "lower network.alpha"]
    if cfg.precision.mixed == "fp16":
        tips.insert(0, "use precision.mixed=bf16 (fp16 overflows on some cards) or no")
    return "Try: " + "; ".join(tips) + "."


def oom_advice() -> str:
    return ("Out of memory. Try: lower dataset.batch_size or dataset.resolution; turn on "
            "precision.gradient_checkpointing; keep dataset.cache_latents on (memory or disk); use "
            "optimizer.name=adamw8bit on CUDA; precision.mixed=fp16 or bf16.")


def advice_for(error: str) -> str:
    """Advice for an error message written without any (an out-of-memory error raised outside the loop)."""
    return oom_advice() if "out of memory" in error.lower() else ""
