import re
import typing

import pytest

from training.config import (
    CONFIG_DIR,
    METHODS,
    TrainConfig,
    _parsed,
    apply_overrides,
    config_from_dict,
    load_config,
    save_config,
    scaled_target_layers,
    setting_keys,
    target_layers,
)
from training.methods import get_method

SHIPPED = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def test_configs_are_shipped():
    assert {"tiny", "smollm2-scit", "smollm2-dual", "smollm2-lorra"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_parses(name):
    cfg = load_config(CONFIG_DIR / f"{name}.yaml")
    assert isinstance(cfg, TrainConfig) and cfg.method in METHODS
    assert cfg.phase1.batch_size % cfg.phase1.micro_batch_size == 0
    assert cfg.align.batch_size % cfg.align.micro_batch_size == 0


def test_defaults_are_the_paper_values():
    cfg = TrainConfig()
    assert (cfg.align.lora.r, cfg.align.lora.alpha, cfg.align.lora.dropout) == (8, 16, 0.05)
    assert cfg.align.lora.target_modules == ["q_proj", "v_proj"]
    assert (cfg.align.alpha, cfg.phase1.label_smoothing) == (5.0, 0.2)
    assert get_method(cfg.method).max_res_len == 512 and get_method("dual").max_res_len == 64


def test_layers_scale_with_depth():
    assert scaled_target_layers(32) == [10, 12, 14, 16, 18, 20]
    assert scaled_target_layers(30) == [9, 11, 13, 15, 17, 19]
    assert all(1 <= layer <= 4 for layer in scaled_target_layers(4))
    with pytest.raises(ValueError, match="outside 1..4"):
        target_layers(_with_layers([5]), 4)


def _with_layers(layers):
    cfg = TrainConfig()
    cfg.align.target_layers = layers
    return cfg


def test_unknown_keys_are_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("align:\n  alhpa: 3\n")
    with pytest.raises(ValueError, match=r"unknown config key align\.alhpa"):
        load_config(path)
    path.write_text("method: ppo\n")
    with pytest.raises(ValueError, match="method"):
        load_config(path)


def test_overrides_parse_by_field_type():
    cfg = apply_overrides(TrainConfig(), [
        "--align.alpha", "10", "--phase1.steps=120", "--align.target_layers", "9,11,13",
        "--phase1.lora.target_modules", "q_proj,v_proj", "--eval.rows", "240:300", "--phase1.val_rows", "none",
        "--collect.layers=null", "--phase1.good_instruction", "Be kind.", "--warmup_ratio", "0.05",
    ])
    assert cfg.align.alpha == 10.0 and isinstance(cfg.align.alpha, float)
    assert cfg.phase1.steps == 120 and cfg.align.target_layers == [9, 11, 13]
    assert cfg.phase1.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.eval.rows == "240:300" and cfg.phase1.val_rows is None and cfg.collect.layers is None
    assert cfg.phase1.good_instruction == "Be kind." and cfg.warmup_ratio == 0.05
    assert cfg.align.lora.target_modules == ["q_proj", "v_proj"]  # the other LoRA is untouched


def test_overrides_return_a_copy_and_the_last_flag_wins():
    cfg = TrainConfig()
    out = apply_overrides(cfg, ["--align.steps", "5", "--align.steps=7", "--align.alpha", "-2.5"])
    assert (out.align.steps, out.align.alpha) == (7, -2.5) and cfg.align.steps == 300
    assert apply_overrides(cfg, []) == cfg


@pytest.mark.parametrize("text, value", [("true", True), ("YES", True), ("1", True), ("false", False),
                                         ("no", False), ("0", False)])
def test_bool_overrides(text, value):
    assert _parsed(text, bool) is value
    with pytest.raises(TypeError):
        _parsed("maybe", bool)


@pytest.mark.parametrize("tokens, message", [
    (["--align.steps", "ten"], r"--align\.steps: expected int, got 'ten'"),
    (["--align.alpha=high"], r"--align\.alpha: expected float, got 'high'"),
    (["--align.target_layers", "9,x"], r"--align\.target_layers: expected list\[int\] \| None \(comma-separated"),
    (["--align.steps", "none"], r"--align\.steps: expected int, got 'none'"),
    (["--align.alpha"], r"--align\.alpha: expected a value \(float\)"),
    (["--align.alpha", "--align.steps", "3"], r"--align\.alpha: expected a value"),
    (["align.alpha", "3"], r"expected a setting --SECTION\.FIELD, got 'align\.alpha'"),
    (["--method", "ppo"], "method must be one of"),
    (["--align.kl_to_phase1", "-1"], r"align\.kl_to_phase1 must be >= 0"),
    (["--phase1.kl_to_base", "-0.5"], r"phase1\.kl_to_base must be >= 0"),
    (["--phase1.mix_rows", "0:240"], r"phase1\.mix_rows names rows of phase1\.mix_data, which is not set"),
])
def test_bad_override_values_name_the_flag_and_type(tokens, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(TrainConfig(), tokens)


@pytest.mark.parametrize("key, guess", [("align.alhpa", "--align.alpha"), ("phase1.lora.rank", "--phase1.lora.r"),
                                        ("eval.row", "--eval.rows"), ("align.lora", None)])
def test_unknown_override_keys_suggest_a_close_match(key, guess):
    with pytest.raises(ValueError, match=rf"unknown setting --{re.escape(key)}") as err:
        apply_overrides(TrainConfig(), [f"--{key}", "3"])
    if guess:
        assert f"did you mean {guess}?" in str(err.value)


def test_every_leaf_field_is_settable():
    samples = {int: "3", float: "0.5", str: "x", bool: "true"}
    for key in setting_keys():
        if key == "method":
            continue
        ftype = _field_type(key)
        text = "none" if "None" in str(ftype) else "4,5" if "list[int]" in str(ftype) else \
            "a=1,b=2" if key == "phase1.stop_at" else "a,b" if "list[str]" in str(ftype) else samples[ftype]
        apply_overrides(TrainConfig(), [f"--{key}", text])


def _field_type(key):
    cls = TrainConfig
    *path, name = key.split(".")
    for part in path:
        cls = typing.get_type_hints(cls)[part]
    return typing.get_type_hints(cls)[name]


@pytest.mark.parametrize("yaml_text, message", [
    ("align:\n  steps: ten\n", r"config key align\.steps: expected int, got 'ten' \(str\)"),
    ("align:\n  alpha: [1]\n", r"config key align\.alpha: expected float, got \[1\] \(list\)"),
    ("phase1:\n  lora:\n    r: 2.5\n", r"config key phase1\.lora\.r: expected int, got 2\.5 \(float\)"),
    ("align:\n  steps: null\n", r"config key align\.steps: expected int, got None"),
    ("align:\n  steps: true\n", r"config key align\.steps: expected int, got True \(bool\)"),
    ("align:\n  lr: 3e-4\n", r"config key align\.lr: expected float, got '3e-4' \(str\); YAML reads 3e-4 as a string"),
    ("collect:\n  layers: [1, x]\n", r"config key collect\.layers: expected list\[int\] \| None"),
    ("phase1:\n  lora:\n    target_modules: q_proj\n", r"phase1\.lora\.target_modules: expected list\[str\]"),
    ("eval:\n  rows: 240\n", r"config key eval\.rows: expected str \| None, got 240 \(int\)"),
    ("align:\n  lora: 8\n", r"config align\.lora: expected a mapping, got int"),
])
def test_leaf_types_are_checked_on_load(tmp_path, yaml_text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ValueError, match=message):
        load_config(path)


def test_ints_load_into_float_fields_and_none_where_allowed():
    cfg = config_from_dict({"align": {"alpha": 10, "target_layers": None}, "phase1": {"steps": None, "epochs": 1}})
    assert cfg.align.alpha == 10.0 and isinstance(cfg.align.alpha, float) and isinstance(cfg.phase1.epochs, float)
    assert cfg.align.target_layers is None and cfg.phase1.steps is None


def test_unknown_yaml_keys_suggest_a_close_match():
    with pytest.raises(ValueError, match=r"unknown config key align\.alhpa \(did you mean align\.alpha\?\)"):
        config_from_dict({"align": {"alhpa": 3}})


def test_a_saved_config_round_trips(tmp_path):
    cfg = apply_overrides(load_config("smollm2-scit"), ["--align.alpha", "10", "--phase1.val_rows", "200:240"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_phase1_stop_at_names_an_adapter_and_a_step():
    config = apply_overrides(TrainConfig(), ["--phase1.stop_at", "good=50"])
    assert config.phase1.stop_steps(["good", "bad"]) == {"good": 50, "bad": None}
    with pytest.raises(ValueError, match=r"names \['good'\]; this method's phase-1 adapters are \['scit'\]"):
        config.phase1.stop_steps(["scit"])
    for bad in ("good", "good=0", "=5", "good=x"):
        with pytest.raises(ValueError, match="expected ADAPTER=STEP"):
            apply_overrides(TrainConfig(), ["--phase1.stop_at", bad])
    assert apply_overrides(config, ["--phase1.stop_at="]).phase1.stop_at == []
