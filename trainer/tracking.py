"""TensorBoard for users who live in it: losses, learning rate, validation and samples of a run written to
RUN_DIR/tensorboard through accelerate's TensorBoard tracker. One more consumer of the engine's events, like the
CLI's progress bar and events.jsonl (tensorboard is an optional extra: pip install 'loradesk[tensorboard]')."""
from __future__ import annotations

from pathlib import Path

from .events import Event, Failed, Finished, Progress, SampleWritten, Validation


class TensorBoardLog:
    """Callback: each event that has a number or an image becomes a TensorBoard scalar or image at its step."""

    def __init__(self, run_dir: str | Path):
        from accelerate.tracking import TensorBoardTracker
        self.tracker = TensorBoardTracker(Path(run_dir).name, logging_dir=str(Path(run_dir) / "tensorboard"))
        self.tracker.start()  # accelerate's trackers open their writer in start() (Accelerator.init_trackers)

    def __call__(self, event: Event) -> None:
        if isinstance(event, Progress):
            self.tracker.log({"train/loss": event.loss, "train/loss_smoothed": event.loss_ema, "train/lr": event.lr},
                             step=event.step)
        elif isinstance(event, Validation):
            values = {"validation/loss": event.loss}
            values.update({f"validation/loss_t{t}": v for t, v in event.per_timestep.items()})
            self.tracker.log(values, step=event.step)
        elif isinstance(event, SampleWritten):
            self._log_samples(event)
        elif isinstance(event, (Finished, Failed)):
            self.tracker.finish()

    def _log_samples(self, event: SampleWritten) -> None:
        import numpy as np
        from PIL import Image
        for i, path in enumerate(event.paths):
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))[None]  # [1, H, W, 3]
            self.tracker.log_images({f"samples/{i}": pixels}, step=event.step, dataformats="NHWC")
