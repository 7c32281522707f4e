import pytest

from training.config import CONFIG_DIR, METHODS, TrainConfig, load_config, scaled_target_layers, target_layers

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
    assert cfg.max_res_len() == 512 and TrainConfig(method="dual").max_res_len() == 64


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
