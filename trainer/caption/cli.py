"""The CLI's `caption` command: `python -m trainer caption DATASET --model MODEL ...`.

trainer/__main__.py calls `register(subparsers)`. Like the rest of the CLI it uses only trainer's public API.
"""
from __future__ import annotations

import argparse

from trainer import CAPTIONER_MEMORY, CaptionError, CaptionOptions, DatasetError, caption_dataset


def register(sub) -> None:
    c = sub.add_parser("caption", help="write captions for a dataset folder with a local caption model",
                       description="Caption the images of a dataset folder that have no caption (all of them with "
                                   "--overwrite). Each caption is written atomically where training reads it, "
                                   "without the trigger: training puts the dataset's trigger in front, as for "
                                   "typed captions.")
    c.add_argument("dataset", metavar="DATASET", help="the dataset folder (subfolders such as 10_name included)")
    c.add_argument("--model", required=True, help=_model_help())
    c.add_argument("--mode", choices=["sentence", "tags"],
                   help="sentence (Florence-2, BLIP, Qwen-VL) or tags (a WD tagger); default: what the model writes")
    c.add_argument("--prefix", default="", help="text put in front of each caption, joined with ', '")
    c.add_argument("--suffix", default="", help="text put after each caption, joined with ', '")
    keep = c.add_mutually_exclusive_group()
    keep.add_argument("--overwrite", action="store_true", help="replace existing captions")
    keep.add_argument("--skip", action="store_true", help="keep existing captions (the default)")
    c.add_argument("--batch-size", type=int, default=4, metavar="N", help="images per batch (default 4)")
    c.add_argument("--threshold", action="append", default=[], metavar="[CATEGORY=]SCORE",
                   help="a WD tagger's threshold per category: general (default 0.35), character (0.85), rating "
                        "(off unless given: the most likely rating tag, when it reaches it); a bare number sets "
                        "general; repeatable, e.g. --threshold 0.4 --threshold character=0.9")
    c.add_argument("--prompt", help="Florence-2: its task, <CAPTION>, <DETAILED_CAPTION> (default) or "
                                    "<MORE_DETAILED_CAPTION>; BLIP: text the caption continues (e.g. 'a photo of'); "
                                    "Qwen-VL: the request (default: one or two sentences for training)")
    c.add_argument("--device", choices=["cuda", "cpu"], help="default: the GPU when there is one")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_caption)


def _model_help() -> str:
    kinds = "; ".join(CAPTIONER_MEMORY.values())
    return ("caption model: a local folder (offline) or, where the machine reaches the hub, a hub name. Its kind "
            f"is read from its files. Memory for the weights: {kinds}")


def parse_thresholds(values: list[str]) -> dict[str, float]:
    """['0.4', 'character=0.9'] -> {'general': 0.4, 'character': 0.9}."""
    out = {}
    for text in values:
        key, sep, value = text.rpartition("=")
        key = key.strip() if sep else "general"
        try:
            out[key] = float(value)
        except ValueError:
            raise CaptionError(f"--threshold {text!r} is not [CATEGORY=]SCORE, e.g. 0.35 or character=0.85") \
                from None
    return out


def named_as_argument(text: str) -> str:
    """A dataset message for this command: the dataset rules (trainer.data's scan) name the folder by its config
    key, dataset.path; here the user gave it as the DATASET argument."""
    return text.replace("dataset.path", "DATASET")


def cmd_caption(args: argparse.Namespace) -> int:
    options = CaptionOptions(mode=args.mode, prefix=args.prefix, suffix=args.suffix, overwrite=args.overwrite,
                             batch_size=args.batch_size, thresholds=parse_thresholds(args.threshold) or None,
                             prompt=args.prompt, device=args.device)
    bar = _Bar(args.quiet)
    try:
        report = caption_dataset(args.dataset, args.model, options, progress=bar.update, message=bar.write)
    except DatasetError as e:
        raise DatasetError(named_as_argument(str(e))) from None
    finally:
        bar.close()
    print(f"wrote {len(report.written)} captions, kept {len(report.kept)} existing"
          + (" (--overwrite replaces them)" if report.kept else "")
          + (f", skipped {len(report.skipped)} (named above)" if report.skipped else "")
          + (f"; training puts the trigger {report.trigger!r} in front" if report.trigger else ""))
    if report.backup is not None:
        print(f"the captions it replaced are kept in {report.backup}")
    return 0


class _Bar:
    """A tqdm bar made on the first progress report (nothing shows while the model loads); messages go above it."""

    def __init__(self, quiet: bool):
        self.quiet, self.bar = quiet, None

    def update(self, done: int, total: int) -> None:
        if self.quiet:
            return
        if self.bar is None:
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="image", desc="captions")
        self.bar.update(done - self.bar.n)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
