"""CLI commands of the adapter toolkit: blend, resize, bake, analyze, generate.

`trainer/__main__.py` calls `register(subparsers)`; each parser's `func` is a `cmd_<name>(args) -> int` that returns
0 on success and 2 on a user error (message on stderr). `python -m trainer.adapters.cli ...` runs them alone.
Like the rest of the CLI it uses only trainer's public API. Every adapter argument is a file, a checkpoint folder
or a run folder (`trainer.adapter_file`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainer import (UserError, adapter_file, adapter_weight, guidance_scale, os_error_message,  # torch-free:
                     save_image_atomic, write_json_atomic)  # registering is cheap


class UsageError(UserError):
    """A bad flag or argument; the message names the flag and the fix."""


def parse_weighted(text: str, default: float = 1.0) -> tuple[str, float]:
    """'FILE:WEIGHT' -> (FILE, WEIGHT); the last colon splits only if a number follows (C:\\x.safetensors works).
    A weight that is NaN or infinite is refused (the engine's rule, trainer.adapter_weight)."""
    head, sep, tail = text.rpartition(":")
    if sep:
        try:
            weight = float(tail)
        except ValueError:
            return text, default
        return head, adapter_weight(weight, Path(head).name)
    return text, default


def register(subparsers) -> None:
    _blend_parser(subparsers)
    _resize_parser(subparsers)
    _bake_parser(subparsers)
    _analyze_parser(subparsers)
    _generate_parser(subparsers)
    _compare_parser(subparsers)


# ---- parsers -----------------------------------------------------------------------------------------------------

_MODEL_HELP = ("the base model, needed only for DoRA layers (their change rescales the base weights); the result "
               "is a plain LoRA either way")


def _blend_parser(sub) -> None:
    p = sub.add_parser("blend", help="Merge weighted adapters into one adapter file.",
                       description="Merge adapters: exact (rank = sum of ranks) or SVD-compressed with --rank.")
    p.add_argument("adapters", nargs="+", metavar="FILE[:WEIGHT]",
                   help="adapter files, checkpoint or run folders, with weights (default 1)")
    p.add_argument("--out", required=True, help="output .safetensors in the family's layout (kohya; SD3: diffusers, "
                                                "with <name>-kohya.safetensors beside it)")
    p.add_argument("--rank", type=int, help="compress every layer to this rank by SVD (default: exact; adapters "
                                            "with LyCORIS layers, LoHa/LoKr/DoRA/Tucker LoCon, need a rank)")
    p.add_argument("--model", help=_MODEL_HELP)
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"], help="precision of the file")
    p.add_argument("--report", help="also write the per-layer kept-norm report as JSON here")
    p.set_defaults(func=cmd_blend)


def _resize_parser(sub) -> None:
    p = sub.add_parser("resize", help="Change an adapter's rank by SVD.",
                       description="Resize each layer to --rank, or to the smallest rank keeping --keep of its norm.")
    p.add_argument("adapter", help="adapter .safetensors")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=int, help="the new rank of every layer")
    size.add_argument("--keep", type=float, help="share of each layer's Frobenius norm to keep, e.g. 0.95")
    p.add_argument("--out", required=True, help="output .safetensors (as blend's --out)")
    p.add_argument("--model", help=_MODEL_HELP)
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"], help="precision of the file")
    p.add_argument("--report", help="also write the per-layer report as JSON here")
    p.set_defaults(func=cmd_resize)


def _bake_parser(sub) -> None:
    p = sub.add_parser("bake", help="Merge adapters into the base model and save the model.",
                       description="Bake adapters into a base model. --out ending in .safetensors writes one "
                                   "original-layout checkpoint (A1111, ComfyUI); otherwise a diffusers folder.")
    p.add_argument("adapters", nargs="+", metavar="FILE[:WEIGHT]", help="adapter files with weights (default 1)")
    p.add_argument("--model", default="", help="base model (empty: the tiny built-in model)")
    p.add_argument("--out", required=True, help="a .safetensors file or a folder")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"],
                   help="precision (default: fp16 for a single file, the model's own for a folder)")
    p.set_defaults(func=cmd_bake)


def _analyze_parser(sub) -> None:
    p = sub.add_parser("analyze", help="Singular values, effective ranks and subspace similarity of adapters.",
                       description="Per-layer spectrum of an adapter; with two adapters also the subspace "
                                   "similarity heatmaps of Hu et al. 2021, Figure 3.")
    p.add_argument("adapters", nargs="+", metavar="FILE", help="one or two adapter files")
    p.add_argument("--out", required=True, help="output folder (analysis.json and heatmap PNGs)")
    p.add_argument("--layers", nargs="*", help="kohya layer names for the heatmaps (default: up to 4 q/v layers)")
    p.set_defaults(func=cmd_analyze)


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="Generate an image with adapters blended in.")
    p.add_argument("--model", default="", help="base model (empty: the tiny built-in model)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]", help="repeatable")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--seed", type=int, help="seed of the first image (default: the model's sampling.seed, as a "
                                            "run's first sample)")
    p.add_argument("--steps", type=int, help="denoising steps, at least 1 (default: the model's sampling.steps)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance (default: the model's sampling.guidance,"
                                                  " what its training samples use)")
    p.add_argument("--width", type=int, help="a multiple of 8 (default: the model's native size)")
    p.add_argument("--height", type=int, help="a multiple of 8 (default: the model's native size)")
    p.add_argument("--num-images", type=int, default=1,
                   help="images with seeds seed, seed+1, ...; more than one are written as OUT-<k>.png")
    p.add_argument("--out", required=True, help="output .png")
    p.set_defaults(func=cmd_generate)


def _compare_parser(sub) -> None:
    p = sub.add_parser("compare", help="A grid of a run's checkpoints: rows = checkpoints (validation loss, best "
                                       "marked), columns = prompts x seeds.")
    p.add_argument("run", metavar="RUN_DIR")
    p.add_argument("--prompt", action="append", default=[], help="repeatable (default: the run's sample prompts)")
    p.add_argument("--seeds", help="comma-separated (default: the run's sampling.seed and the next one)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the run's sampling.steps)")
    p.add_argument("--size", type=int, help="image side in pixels (default: the model's native size)")
    p.add_argument("--out", required=True, help="output .png")
    p.set_defaults(func=cmd_compare)


# ---- commands ----------------------------------------------------------------------------------------------------

def _user_errors(fn):
    """Turn a user's mistake (or a file that cannot be written, such as an --out in a read-only folder) into its
    message on stderr and exit status 2. Anything else is a bug and keeps its traceback."""
    def run(args) -> int:
        try:
            return fn(args)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except OSError as e:  # the file, the OS's words and the fix, as the other commands say it
            print(f"error: {os_error_message(e)}", file=sys.stderr)
            return 2
    run.__name__, run.__doc__ = fn.__name__, fn.__doc__
    return run


def _check_file(path: str) -> Path:
    """The adapter file an argument stands for (a file, a checkpoint folder or a run folder)."""
    return adapter_file(path)


def _check_out(path: str, suffix: str) -> None:
    if not path.lower().endswith(suffix):
        raise UsageError(f"--out {path} must end in {suffix}")


def _check_rank(rank: int | None) -> None:
    if rank is not None and rank < 1:
        raise UsageError(f"--rank must be at least 1, got {rank}")


def _load(path: str):
    from trainer import load_adapter
    return load_adapter(_check_file(path))


def _with_base(model: str | None, adapters: list) -> tuple[list, dict | None]:
    """The adapters under the model's names and the model's weights by kohya name (what DoRA layers need), when
    --model is given; else the adapters as they are and None."""
    if not model:
        return adapters, None
    from trainer import aligned_names, base_weights, load_base_model
    index = load_base_model(model).module_index()
    return [aligned_names(adapter, index) for adapter in adapters], base_weights(index)


@_user_errors
def cmd_blend(args) -> int:
    from trainer import merge_exact, merge_svd, save_merged
    _check_out(args.out, ".safetensors")
    _check_rank(args.rank)
    specs = [parse_weighted(text) for text in args.adapters]
    adapters, base = _with_base(args.model, [_load(path) for path, _ in specs])
    pairs = [(adapter, weight) for adapter, (_, weight) in zip(adapters, specs)]
    titles = [Path(path).stem for path, _ in specs]
    labels = [Path(path).name for path, _ in specs]
    if args.rank is None:
        merged, report = merge_exact(pairs, titles, labels), None
    else:
        merged, report = merge_svd(pairs, args.rank, titles, labels, base=base)
    written = save_merged(merged, args.out, dtype=args.dtype, source=_check_file(specs[0][0]))
    ranks = sorted({layer.rank for layer in merged.layers.values()})
    print(f"wrote {args.out}: {len(merged)} layers, rank {_span(ranks)}")
    _print_also(written)
    _print_report(report, args.report)
    return 0


@_user_errors
def cmd_resize(args) -> int:
    from trainer import resize_adapter as resize, save_merged
    _check_out(args.out, ".safetensors")
    _check_rank(args.rank)
    if args.keep is not None and not 0 < args.keep <= 1:
        raise UsageError(f"--keep must be in (0, 1], for example 0.95; got {args.keep}")
    (adapter,), base = _with_base(args.model, [_load(args.adapter)])
    resized, report = resize(adapter, rank=args.rank, keep=args.keep, label=Path(args.adapter).name, base=base)
    written = save_merged(resized, args.out, dtype=args.dtype, source=_check_file(args.adapter))
    ranks = sorted({layer.rank for layer in resized.layers.values()})
    print(f"wrote {args.out}: {len(resized)} layers, rank {_span(ranks)}, "
          f"{report['parameters_before']:,} -> {report['parameters_after']:,} parameters")
    _print_also(written)
    _print_report(report, args.report)
    return 0


@_user_errors
def cmd_bake(args) -> int:
    from trainer import bake, is_foreign_folder
    if not args.out.lower().endswith(".safetensors") and is_foreign_folder(args.out):
        raise UsageError(f"--out {args.out} exists and is not a diffusers model folder; choose a new output path")
    specs = [(_check_file(path), weight) for path, weight in map(parse_weighted, args.adapters)]
    out = bake(args.model, specs, args.out, args.dtype)  # paths, so the file names go into the metadata
    print(f"wrote {out}")
    return 0


@_user_errors
def cmd_analyze(args) -> int:
    from trainer import analyze
    if len(args.adapters) > 2:
        raise UsageError(f"analyze takes one or two adapter files, got {len(args.adapters)}")
    adapters = [_load(path) for path in args.adapters]
    _check_layers(args.layers, adapters)
    stems = [Path(path).stem for path in args.adapters] + ["B"]
    labels = (stems[0], stems[1]) if stems[0] != stems[1] else ("A", "B")
    result = analyze(adapters[0], args.out, adapters[1] if len(adapters) > 1 else None, args.layers or None,
                     labels=labels, sources=tuple(args.adapters))
    for label, summary in result["adapters"].items():
        print(f"{label}: mean effective rank {summary['mean_effective_rank']:.2f}, mean rank for 90% / 99% of "
              f"energy {summary['mean_rank_90']:.1f} / {summary['mean_rank_99']:.1f}")
    for name in result.get("similarity", {}).get("heatmaps", {}):
        print(f"heatmap: {Path(args.out) / result['similarity']['heatmaps'][name]['png']}")
    print(f"wrote {Path(args.out) / 'analysis.json'}")
    return 0


def _check_layers(layers: list[str] | None, adapters: list) -> None:
    unknown = [name for name in layers or [] if any(name not in adapter.layers for adapter in adapters)]
    if unknown:
        where = "both adapters" if len(adapters) > 1 else "the adapter"
        raise UsageError(f"--layers: {', '.join(unknown)} not in {where}; give kohya layer names from the file")


def _fill_generate_defaults(args) -> None:
    """Unset --steps, --guidance and --seed: what the model's training samples use (trainer.generation_defaults,
    the rule the Generate tab follows too)."""
    from trainer import generation_defaults
    start = generation_defaults(args.model)
    for flag in ("steps", "guidance", "seed"):
        if getattr(args, flag) is None:
            setattr(args, flag, start[flag])


def _check_generate_flags(args) -> None:
    _check_out(args.out, ".png")
    guidance_scale(args.guidance, "--guidance")
    for flag, value in (("--width", args.width), ("--height", args.height)):
        if value is not None and (value < 8 or value % 8):
            raise UsageError(f"{flag} must be a positive multiple of 8 (the VAE works in 8-pixel cells), got {value}")
    for flag, value in (("--steps", args.steps), ("--num-images", args.num_images)):
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")


def _image_paths(out: str, n: int) -> list[Path]:
    out = Path(out)
    return [out] if n == 1 else [out.with_name(f"{out.stem}-{k}{out.suffix}") for k in range(1, n + 1)]


@_user_errors
def cmd_generate(args) -> int:
    from trainer import Generator
    _fill_generate_defaults(args)
    _check_generate_flags(args)
    specs = [(str(_check_file(path)), weight) for path, weight in map(parse_weighted, args.lora)]
    generator = Generator(args.model)  # an adapter given twice is blended once at the sum of its weights
    generator.set_adapters([(path, weight, True) for path, weight in specs])
    native = generator.base.native_resolution
    images = generator.generate(args.prompt, args.negative, args.seed, args.steps, args.guidance,
                                args.width or native, args.height or native, num_images=args.num_images)
    for image, path in zip(images, _image_paths(args.out, args.num_images)):
        save_image_atomic(image, path)
        print(f"wrote {path}")
    return 0


@_user_errors
def cmd_compare(args) -> int:
    from trainer import compare_checkpoints
    _check_out(args.out, ".png")
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()] if args.seeds else None
    except ValueError:
        raise UsageError(f"--seeds {args.seeds!r} must be whole numbers separated by commas") from None
    grid = compare_checkpoints(args.run, args.prompt or None, seeds, args.steps, args.size)
    save_image_atomic(grid, args.out)
    print(f"wrote {args.out}")
    return 0


def _print_also(written: list[Path]) -> None:
    """The other layouts written beside --out (SD3's adapters: one file per layout, as its runs write them)."""
    for path in written[1:]:
        print(f"also wrote {path} ({path.stem.rsplit('-', 1)[-1]} layout)")


def _span(values: list[int]) -> str:
    return str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"


def _print_report(report: dict | None, path: str | None) -> None:
    if report is None:
        return
    worst = min(report["layers"].items(), key=lambda kv: kv[1]["kept"])
    print(f"kept {report['kept_overall']:.2%} of the norm overall; lowest layer {worst[1]['kept']:.2%} ({worst[0]})")
    if report.get("converted"):
        kinds = ", ".join(f"{n} {kind}" for kind, n in report["converted"].items())
        print(f"LyCORIS layers became plain LoRA (SVD of their deltas): {kinds}")
    if path:
        write_json_atomic(path, report)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.adapters.cli")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
