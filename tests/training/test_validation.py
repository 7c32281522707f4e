"""Phase 1 is judged on validation rows, and phase 2 refuses a phase 1 that did not separate."""

import json
import subprocess
import sys

from training.cli import main
from training.methods import get_method

from .conftest import DATA, ROOT, tiny_config, train


def test_dual_phase1_logs_validation_and_the_gate_refuses_unless_forced(tiny_model_dir, tmp_path, capsys):
    cfg = tiny_config(tmp_path / "c.yaml", {"method": "dual", "phase1": {"dual_steps": 4, "dual_lr": 0.003, "val_rows": "250:254",
                                                       "val_every": 2, "min_separation": 10.0}})
    out = tmp_path / "run"
    train(tiny_model_dir, out, method="dual", config=cfg, command="phase1")
    history = json.loads((out / "phase1" / "validation.json").read_text())["history"]
    # before, every 2 steps and after the last, for each adapter: (0, 2, 4) x (good, bad)
    assert [h["training"] for h in history] == ["good"] * 3 + ["bad"] * 3
    assert history[0]["separation"] == 0.0   # both adapters start as the base
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_step"] for r in records if r.get("phase") == "phase1/good" and "val_step" in r] == [0, 2, 4]
    assert (out / "plots" / "validation.png").is_file()

    capsys.readouterr()
    assert main(["collect", "--out", str(out)]) == 2   # a rise of 10 nats/token is out of reach
    err = capsys.readouterr().err
    assert "did not separate" in err and "--force" in err and not (out / "collect").exists()
    assert main(["collect", "--out", str(out), "--force"]) == 0
    assert (out / "collect" / "summary.json").is_file()

    # the bundle and its card say that phase 1 did not separate, and the shipped command has --force
    assert main(["align", "--out", str(out)]) == 0
    manifest = json.loads((out / "bundle" / "rahf.json").read_text())
    assert manifest["phase1_validation"]["separated"] is False
    assert "did NOT separate" in (out / "bundle" / "README.md").read_text()
    assert main(["eval", "--adapter", str(out / "bundle"), "--base", str(tiny_model_dir), "--data", str(DATA),
                 "--rows", "240:242", "--config", str(cfg), "--record"]) == 0
    dest = tmp_path / "shipped" / "tiny-rahf-dual"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "ship_adapter.py"), str(out), str(dest),
                    "--config", str(cfg)], check=True, cwd=ROOT)
    shipped = json.loads((dest / "rahf.json").read_text())
    assert shipped["command"].endswith("--force") and shipped["command"] in (dest / "README.md").read_text()


def test_stimuli_follow_the_method(tiny_base, tmp_path):
    from training.config import load_config
    from training.context import Context
    from training.data import load_preferences

    cfg = load_config("tiny")
    ctx = Context(acc=None, config=cfg, base_spec="", data=load_preferences(str(DATA), "0:20"), out=tmp_path)
    dual = get_method("dual").stimuli(ctx, tiny_base.tokenizer)
    assert [(s.pair, s.side) for s in dual] == [(i, side) for i in range(20) for side in ("chosen", "rejected")]
    assert all(s.pos is s.neg is s.plain for s in dual)   # one input, two models
    scit = get_method("scit").stimuli(ctx, tiny_base.tokenizer)
    sides = [s.side for s in scit]
    assert [s.pair for s in scit] == list(range(20)) and 5 <= sides.count("chosen") <= 15   # seeded coin flips
    assert sides == [s.side for s in get_method("scit").stimuli(ctx, tiny_base.tokenizer)]   # reproducible
    s = scit[0]
    assert s.pos.input_ids[s.pos.response_start:] == s.neg.input_ids[s.neg.response_start:] \
        == s.plain.input_ids[s.plain.response_start:]
    cfg.collect.pairs = 5
    assert len(get_method("dual").stimuli(ctx, tiny_base.tokenizer)) == 10
