"""The config tree: defaults, help text, sparse presets, every kind of config error, --set overrides."""
import dataclasses
import tomllib
from pathlib import Path

import pytest

from trainer import config as C

ROOT = Path(__file__).resolve().parent.parent
REQUIRED_KEYS = ["model.path", "dataset.path", "dataset.trigger", "dataset.resolution", "dataset.batch_size",
                 "network.rank", "network.alpha", "network.text_encoders", "optimizer.unet_lr",
                 "optimizer.text_encoder_lr", "schedule.max_steps", "sampling.every_n_steps", "saving.every_n_steps",
                 "saving.runs_dir", "run.name", "precision.mixed", "run.seed"]


def write(tmp_path, text, name="cfg.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_required_keys_exist_with_help_and_defaults():
    keys = {f.key: f for f in C.fields()}
    for key in REQUIRED_KEYS:
        assert key in keys, key
    for info in keys.values():
        assert len(info.help) > 10, f"{info.key} needs help text"
    assert keys["network.text_encoders"].type is list and keys["network.text_encoders"].default == ["all"]
    assert keys["precision.mixed"].choices == ["no", "fp16", "bf16"]


def test_dump_and_load_round_trip(tmp_path):
    cfg = C.TrainConfig()
    C.apply_overrides(cfg, ["network.rank=16", "sampling.prompts=['a b', 'c, d']", "dataset.trigger=zqx"])
    again = C.load(write(tmp_path, C.dumps(cfg)))
    assert again == cfg
    sparse = tomllib.loads(C.dumps(cfg, sparse=True))
    assert sparse == {"schema_version": 2, "dataset": {"trigger": "zqx"}, "network": {"rank": 16},
                      "sampling": {"prompts": ["a b", "c, d"]}}


def test_sparse_preset_applies_over_defaults(tmp_path):
    cfg = C.load(write(tmp_path, "schema_version = 1\n[network]\nrank = 4\n"))
    assert cfg.network.rank == 4
    assert cfg.network.alpha == C.NetworkSection().alpha
    assert cfg.optimizer == C.OptimizerSection()


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path, "[network]\nrnak = 4\n", "my-preset.toml")
    with pytest.raises(C.ConfigError) as err:
        C.load(path)
    text = str(err.value)
    assert "network.rnak" in text and "my-preset.toml" in text and "network.rank" in text


def test_unknown_section_is_an_error(tmp_path):
    with pytest.raises(C.ConfigError, match=r"unknown section \[netwrok\]"):
        C.load(write(tmp_path, "[netwrok]\nrank = 4\n"))


def test_every_problem_reported_at_once(tmp_path):
    text = ("[network]\nrank = 'big'\n[optimizer]\nname = 'sgd'\n[dataset]\nbatch_size = 0\n"
            "[precision]\nmixed = 'fp8'\n[run]\nname = '../evil'\n")
    cfg = C.load(write(tmp_path, text.replace("rank = 'big'\n", "")))
    problems = C.validate(cfg, check_paths=False)
    joined = "\n".join(problems)
    assert "optimizer.name" in joined and "sgd" in joined
    assert "dataset.batch_size" in joined and "at least 1" in joined
    assert "precision.mixed" in joined
    assert "run.name" in joined
    assert len(problems) >= 4
    with pytest.raises(C.ConfigError) as err:  # a wrong type is reported together with other load problems
        C.load(write(tmp_path, "[network]\nrank = 'big'\nalpah = 3\n"))
    assert len(err.value.problems) == 2 and "whole number" in err.value.problems[0]


def test_schema_version_too_new_and_bad_toml_and_missing_file(tmp_path):
    with pytest.raises(C.ConfigError, match="schema_version 99"):
        C.load(write(tmp_path, "schema_version = 99\n"))
    with pytest.raises(C.ConfigError, match="not valid TOML"):
        C.load(write(tmp_path, "[network\nrank = 4\n"))
    with pytest.raises(C.ConfigError, match="does not exist"):
        C.load(tmp_path / "nope.toml")


def test_path_checks(tmp_path):
    cfg = C.TrainConfig()
    assert any("dataset.path is empty" in p for p in C.validate(cfg))
    cfg.dataset.path = str(tmp_path / "missing")
    cfg.model.path = str(tmp_path / "model.ckpt")
    problems = "\n".join(C.validate(cfg))
    assert "is not a folder" in problems
    assert "pickle" in problems and "model.trust_pickle" in problems
    cfg.dataset.path = str(tmp_path)
    cfg.dataset.regularization_path = str(tmp_path / "no-reg")
    assert any(p.startswith("dataset.regularization_path") and "not a folder" in p for p in C.validate(cfg))
    cfg.dataset.regularization_path = str(tmp_path)
    assert any("regularization images need a folder of their own" in p for p in C.validate(cfg))


def test_cross_field_rules():
    cfg = C.TrainConfig()
    cfg.network.text_encoders = []
    cfg.network.unet_targets = []
    cfg.network.alpha, cfg.network.rank = 512.0, 4
    cfg.schedule.warmup_steps = 5000
    cfg.loss.min_snr_gamma, cfg.loss.high_noise_weight_cap = 5.0, 50.0
    problems = "\n".join(C.validate(cfg, check_paths=False))
    assert "nothing would be trained" in problems
    assert "alpha/rank" in problems
    assert "warmup_steps" in problems
    assert "two loss weightings" in problems
    cfg.loss.min_snr_gamma, cfg.loss.high_noise_weight_cap = 0.0, 0.5
    assert "cap below 1" in "\n".join(C.validate(cfg, check_paths=False))


def test_set_overrides_parse_types_and_report_bad_ones():
    cfg = C.apply_overrides(C.TrainConfig(), ["network.text_encoders=[]", "optimizer.unet_lr=3e-4",
                                              "run.name=my-run", "dataset.resolution=768"])
    assert cfg.network.text_encoders == [] and cfg.optimizer.unet_lr == 3e-4
    assert cfg.run.name == "my-run" and cfg.dataset.resolution == 768
    with pytest.raises(C.ConfigError) as err:
        C.apply_overrides(C.TrainConfig(), ["network.rnk=3", "network.rank=abc", "oops"])
    assert len(err.value.problems) == 3


def test_a_text_field_takes_the_text_as_written():
    """`--set distributed.gpus=1` and `--set run.name=nan` are text, not the number TOML would read."""
    cfg = C.apply_overrides(C.TrainConfig(), ["distributed.gpus=1", "run.name=nan", "sampling.negative_prompt=2",
                                              'model.path="/my models/x.safetensors"'])
    assert (cfg.distributed.gpus, cfg.run.name) == ("1", "nan")
    assert cfg.sampling.negative_prompt == "2" and cfg.model.path == "/my models/x.safetensors", "quotes: TOML"


def test_target_groups_expand_through_the_family():
    from trainer.models import get_family
    family = get_family("sdxl")
    assert C.expand_targets(["attention", "feed_forward", "projections"], family.unet_groups) == [
        "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"]
    assert len(C.expand_targets(["attention", "mlp"], family.text_encoder_specs[0].groups)) == 6
    assert C.expand_targets(["attention", "to_q", "my.module"], family.unet_groups)[-1] == "my.module"


def test_per_encoder_learning_rates_and_switches():
    cfg = C.TrainConfig()
    C.apply_overrides(cfg, ["network.text_encoders=['te1']", "optimizer.text_encoder_lrs=['te1=2e-5', 'te2=0']"])
    assert C.text_encoder_lr(cfg, "te1") == 2e-5 and C.text_encoder_lr(cfg, "te2") == 0.0
    assert C.text_encoder_lr(cfg, "te") == cfg.optimizer.text_encoder_lr and C.trains_text_encoders(cfg)
    cfg.optimizer.text_encoder_lrs = ["te4=1e-5", "te1=fast"]
    problems = "\n".join(C.validate(cfg, check_paths=False))
    assert "'te4=1e-5' is not prefix=rate" in problems and "'te1=fast'" in problems
    cfg.optimizer.text_encoder_lrs, cfg.network.text_encoders = [], ["te", "clip"]
    assert "'clip' is not a text encoder" in "\n".join(C.validate(cfg, check_paths=False))


def test_a_schema_1_config_is_migrated_with_its_meaning(tmp_path):
    old = write(tmp_path, "schema_version = 1\n[network]\ntext_encoder = false\nrank = 4\n")
    cfg = C.load(old)
    assert cfg.network.text_encoders == [] and cfg.network.rank == 4 and cfg.schema_version == 2
    on = write(tmp_path, "[network]\ntext_encoder = true\n", "on.toml")  # no schema line: the oldest schema
    assert C.load(on).network.text_encoders == ["all"]
    assert "schema_version = 2" in C.dumps(cfg)


@pytest.mark.parametrize("preset", sorted((ROOT / "presets").glob("*.toml")), ids=lambda p: p.stem)
def test_shipped_presets_load_and_only_miss_user_paths(preset):
    cfg = C.load(preset)
    assert tomllib.loads(preset.read_text())["schema_version"] == C.SCHEMA_VERSION
    assert preset.read_text().startswith("#"), "the first line describes the preset for `presets`"
    problems = C.validate(cfg, check_paths=False)
    assert problems == [], problems


def test_config_module_is_stdlib_only():
    import ast
    tree = ast.parse((ROOT / "trainer" / "config.py").read_text())
    imported = {n.names[0].name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree)
                 if isinstance(n, ast.ImportFrom) and n.module and n.level == 0}
    own = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level > 0}
    assert imported <= {"__future__", "dataclasses", "math", "tomllib", "pathlib", "typing", "re", "difflib",
                        "json"}, imported
    # stdlib only too (the families load without torch; models.family: the UNet target groups)
    assert own <= {"errors", "paths", "models.detect", "models.family"}, own
    assert dataclasses.is_dataclass(C.TrainConfig)
