"""loradesk's engine: train, blend and export LoRA adapters for Stable Diffusion. Knows nothing of any UI.

The public API (imported lazily, so `import trainer` stays cheap for the UI and the CLI):
  config      TrainConfig, fields(), load(), validate(), dumps()       (stdlib only)
  events      typed events, read_events(), send_command()
  job         start_job(), Job, active_job()                           (training in a child process)
  runs        list_runs(), run_info(), RunInfo
  loop        Trainer                                                  (training in this process)
  models      load_base_model(), BaseModel
  data        scan_dataset(), BatchPlan, bucket_stats(), load_image()
  formats     load_adapter(), save_adapter(), export_file()
  adapters    Generator, FusedBlender, merge, resize, bake, analyze
"""
__version__ = "0.1.0"
