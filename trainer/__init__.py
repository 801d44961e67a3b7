"""loradesk's engine: train, blend and export LoRA adapters for Stable Diffusion. Knows nothing of any UI.

This module is the public API: the app (`app/`) and the CLI (`python -m trainer`) use only the names below.
They are imported on first use, so `import trainer` stays cheap (the app builds its page without torch).

Errors
  UserError                 base of every error a user can fix (one line: it names the file or field and the fix)
Config (stdlib only)
  TrainConfig, FieldInfo, ConfigError, SECTIONS, fields(), field_info(), get_value(), set_value(),
  apply_overrides(), load_config(path, overrides), dumps(cfg)
  config_problems(cfg), check_config(cfg)  the complete check: the config and what this machine can do for it
  default_config(model_path, runs_dir)     defaults that follow the base model (its native size)
  generation_defaults(model_path)          steps, guidance, seed, negative prompt, size: what its samples use
  list_presets(), preset_note(), load_preset(name, overrides), apply_preset(current, name, filled) -> (cfg, notes),
  resolve_config(name, overrides) (what the CLI trains: load_preset plus the family's sampling values)
Base models
  load_base_model(path) -> BaseModel, ModelLoadError, resolve_model_path(), native_resolution(path),
  training_defaults(path), model_summary(path) (family, native size, text encoders: from config files only),
  TEXT_ENCODER_NAMES (te, te1, te2, te3: how the config names text encoders), named_text_encoders(names, model)
  (which of them network.text_encoders gives a LoRA: 'all' leaves SD3's T5 out), layout_choices(model or run)
  ((layout, the programs that read it) for its adapters, saving.format "auto"'s first),
  network_fields_in_use(cfg.network) (the network.* keys that network reads: the form shows those),
  network_fields_always_read() (those every network reads)
Datasets
  scan_dataset(ds) -> DatasetScan (items, skipped, warnings, trigger), DatasetError, ImageLoadError, probe_image(),
  IMAGE_EXTENSIONS, CAPTION_EXTENSIONS, DATASET_FILE, is_image_file(), is_ignored(), read_caption(),
  decode_caption(), write_caption(), with_trigger(), dataset_trigger(), set_dataset_trigger(), BatchPlan,
  bucket_stats(), leaves_folder(path, root) (a link out of a folder: never opened)
Runs
  start_run(cfg) -> Job (in a child process), resume_run(run_dir); in this process: create_run_dir(cfg),
  check_resumable(run_dir, overrides), run_here(run_dir, resume, callbacks) (INTERRUPTED: its code after a Ctrl+C
  while loading); send_command(run_dir, "stop"|"save"|"sample"), active_run(runs_dir),
  list_runs(runs_dir), run_info(run_dir) -> RunInfo, load_run_config(), checkpoint_dirs(), tail_events(path),
  read_events(path), the events (Event, Started, Progress, SampleWritten, CheckpointWritten, Validation, Message,
  Finished, Failed), smoothed(values), run_checkpoint(run_dir, step|'best'), best_checkpoint(run_dir), JobError,
  oom_advice(), os_error_message(err) (an OSError as one line with the fix); several processes: world_size(cfg),
  global_batch(cfg), launch_command(cfg, run_dir), in_worker(),
  as_launched(cfg), shared_run_dir(runs_dir, create), launch_marker(runs_dir), is_main_process() (under
  `accelerate launch ... -m trainer train`), visible_gpus(), chosen_gpus(processes, gpus), gpu_settings(indices)
  (the GPU picker)
Adapters (a source is an adapter file, a checkpoint folder or a run folder, always at its trained strength)
  adapter_file(source), checkpoint_step(file), load_adapter(source) -> Adapter (NaN/inf, integer tensors and all
  alphas 0 refused), LoraLayer, LohaLayer, LokrLayer (LyCORIS), consumer_warnings(adapter) (what a consumer would
  apply otherwise: DoRA's axis), export_plain_lora(src, out, rank, model) (any adapter as a plain LoRA, by SVD),
  aligned_names(adapter, index), base_weights(index) (the model's weights DoRA layers need),
  check_adapter(source, model_path) (read + fits that model, from its configs), save_adapter(), export_adapter(),
  AdapterFormatError, merge_exact(), merge_svd(), save_merged() (a merged adapter in its family's layouts),
  resize_adapter(), bake(), is_foreign_folder(), analyze(),
  Generator, image_grid(), compare_checkpoints(run_dir) (checkpoints x prompts and seeds, validation losses)
  adapter_weight(value, label), guidance_scale(value, name), seed_value(value), finite_number(), NotFiniteError:
  the one rule for adapter weights, guidance and seeds (NaN, infinity, seeds torch cannot take refused by name)
The job queue (RUNS_DIR/queue/, one JSON file per job; `python -m trainer queue ...`)
  queue_train(cfg) (checked as train checks it), queue_command(argv, runs_dir) (export, blend, caption) -> QueueJob,
  list_queue(runs_dir) -> (jobs in order, damaged-file lines), move_job(runs_dir, id, to), remove_job(),
  resume_job() (a stopped, failed or killed job again, from its checkpoint), stop_job(), QueueError,
  run_queue(runs_dir, gpus) (the runner, in this process), start_runner(runs_dir, gpus) (it, as its own process,
  its output in RUNNER_LOG), runner_argv(runs_dir, gpus) (the command that starts it
  as its own process), runner_active(runs_dir)
Files
  atomic_path(), write_text_atomic(), write_json_atomic(), save_image_atomic()
Captions by a local model
  caption_dataset(), preview_captions() (nothing written), load_captioner(), CaptionOptions, CaptionResult,
  CaptionReport, CaptionError, CAPTIONER_MEMORY (what each captioner kind needs in memory)
"""
from __future__ import annotations

from .lazy import lazy_getattr

__version__ = "0.1.0"

_EXPORTS = {
    "UserError": "errors",
    # config
    **dict.fromkeys(["TrainConfig", "FieldInfo", "ConfigError", "SECTIONS", "fields", "field_info", "get_value",
                     "set_value", "apply_overrides", "dumps"], "config"),
    "load_config": "config:load",
    **dict.fromkeys(["config_problems", "check_config"], "job"),
    **dict.fromkeys(["default_config", "generation_defaults", "list_presets", "preset_note", "load_preset",
                     "apply_preset", "resolve_config"], "presets"),
    # base models
    **dict.fromkeys(["load_base_model", "BaseModel", "ModelLoadError", "resolve_model_path", "native_resolution",
                     "training_defaults", "model_summary"], "models"),
    **dict.fromkeys(["TEXT_ENCODER_NAMES", "text_encoder_lr"], "config"),
    # datasets
    **dict.fromkeys(["scan_dataset", "DatasetScan", "DatasetError", "ImageLoadError", "probe_image",
                     "IMAGE_EXTENSIONS", "CAPTION_EXTENSIONS", "DATASET_FILE", "read_caption", "decode_caption",
                     "write_caption", "with_trigger", "dataset_trigger", "set_dataset_trigger", "is_image_file",
                     "is_ignored", "leaves_folder", "BatchPlan", "bucket_stats"], "data"),
    # runs
    **dict.fromkeys(["start_run", "resume_run", "check_resumable", "run_here", "active_run", "JobError", "Job"],
                    "job"),
    **dict.fromkeys(["create_run_dir", "list_runs", "run_info", "RunInfo", "load_run_config", "checkpoint_dirs",
                     "adapter_file", "checkpoint_step", "smoothed", "run_checkpoint", "best_checkpoint"], "runs"),
    **dict.fromkeys(["send_command", "tail_events", "read_events", "Event", "Started", "Progress", "SampleWritten",
                     "CheckpointWritten", "Validation", "Message", "Finished", "Failed", "INTERRUPTED"], "events"),
    **dict.fromkeys(["oom_advice", "os_error_message"], "advice"),
    **dict.fromkeys(["finite_number", "adapter_weight", "guidance_scale", "seed_value", "NotFiniteError"], "finite"),
    **dict.fromkeys(["world_size", "global_batch"], "config"),
    **dict.fromkeys(["launch_command", "in_worker", "as_launched", "shared_run_dir",
                     "launch_marker", "is_main_process", "visible_gpus", "chosen_gpus", "gpu_settings"],
                    "distributed"),
    # adapters
    **dict.fromkeys(["load_adapter", "check_adapter", "save_adapter", "export_adapter", "AdapterFormatError"],
                    "formats"),
    **dict.fromkeys(["Adapter", "LoraLayer", "LohaLayer", "LokrLayer"], "lora_state"),
    **dict.fromkeys(["consumer_warnings", "aligned_names"], "formats.check"),
    "export_plain_lora": "formats.export",
    **dict.fromkeys(["network_fields_in_use", "network_fields_always_read"], "config"),
    "base_weights": "adapters.delta",
    # (from their modules: trainer.adapters.analyze and .bake are submodules, shadowing the package's names)
    **dict.fromkeys(["merge_exact", "merge_svd", "save_merged"], "adapters.merge"),
    **dict.fromkeys(["bake", "is_foreign_folder"], "adapters.bake"),
    "compare_checkpoints": "adapters.compare",
    "analyze": "adapters.analyze",
    "Generator": "adapters.generate",
    "resize_adapter": "adapters.resize:resize",
    "image_grid": "adapters.grid",
    **dict.fromkeys(["caption_dataset", "preview_captions", "load_captioner", "CaptionOptions", "CaptionResult",
                     "CaptionReport", "CaptionError"], "caption"), "CAPTIONER_MEMORY": "caption:MEMORY_HELP",
    # the job queue
    **dict.fromkeys(["QueueJob", "QueueError", "queue_train", "queue_command", "list_queue", "move_job", "remove_job",
                     "resume_job", "stop_job", "run_queue", "runner_active", "runner_argv", "start_runner",
                     "RUNNER_LOG"], "queue"),
    # files
    **dict.fromkeys(["atomic_path", "write_text_atomic", "write_json_atomic", "save_image_atomic"], "atomic"),
}

__all__ = sorted([*_EXPORTS, "named_text_encoders", "layout_choices"])


__getattr__ = lazy_getattr(__name__, _EXPORTS)


def named_text_encoders(names: list[str], model_path: str = "") -> list[str]:
    """The text encoders (of TEXT_ENCODER_NAMES) that network.text_encoders `names` gives a LoRA: each one named,
    and with 'all' each one its family trains by default (TextEncoderSpec.trains_by_default: SD3's T5, te3, only
    when named). The base model's family decides for its own encoders (from its config files; SD 1.x when they do
    not tell), the first family that has one for the others. network.trained_text_encoders applies the same rule
    to a loaded model."""
    from .config import TEXT_ENCODER_NAMES
    from .models.detect import all_families
    family = _family_of_source(model_path)
    specs = {}
    for spec in [s for f in (family, *all_families()) for s in f.text_encoder_specs]:
        specs.setdefault(spec.prefix.removeprefix("lora_"), spec)  # the model's own family first
    return [name for name in TEXT_ENCODER_NAMES
            if name in names or ("all" in names and specs[name].trains_by_default)]


def layout_choices(source: str = "") -> list[tuple[str, str]]:
    """(layout, the programs that read it) for the adapters of a base model ("" = the tiny one) or of a run folder
    (its config's model), the one saving.format "auto" writes first (Family.layouts)."""
    return list(_family_of_source(str(source)).layouts.items())


def _family_of_source(source: str):
    """A run folder's family (its config's model.family, else its model's configs, else its adapter's names), or a
    base model's (detect.default_family, SD 1.x, when its files do not tell: a hub id)."""
    from .models.detect import default_family, get_family
    from .models.info import family_name
    from .runs import is_run_dir, load_run_config
    if source and is_run_dir(source):
        model = load_run_config(source).model
        name = model.family if model.family != "auto" else family_name(model.path)
        return get_family(name) if name is not None else _adapter_family(source)
    name = family_name(source)
    return get_family(name) if name is not None else default_family()


def _adapter_family(run_dir: str):
    """The family a run's adapter names show (its model's files are not at hand: a hub id); the default without one."""
    from .errors import UserError
    from .formats import load_adapter
    from .formats.write import family_of
    from .models.detect import default_family
    from .runs import adapter_file
    try:
        return family_of(load_adapter(adapter_file(run_dir)))
    except UserError:  # no adapter yet
        return default_family()


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
