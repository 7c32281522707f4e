"""`rahf-train` parsing: dotted config flags, --force, the default base; nothing here trains."""

from __future__ import annotations

import json

import pytest
import yaml

from training import cli
from training.cli import DEFAULT_BASE, main, parse_args
from training.data import DataError

from .conftest import DATA

FLAGS = ["--align.alpha", "10", "--phase1.steps", "120", "--align.target_layers", "9,11,13",
         "--phase1.lora.target_modules", "q_proj,v_proj", "--eval.rows", "240:300", "--phase1.val_rows", "none"]
SETTINGS = ["--align.alpha=10", "--phase1.steps=120", "--align.target_layers=9,11,13",
            "--phase1.lora.target_modules=q_proj,v_proj", "--eval.rows=240:300", "--phase1.val_rows=none"]


@pytest.mark.parametrize("command", ["run", "phase1", "collect", "align"])
def test_run_subcommands_take_dotted_flags_anywhere(command):
    args = parse_args([command, "--align.alpha", "10", "--out", "runs/x", *FLAGS[2:], "--seed", "3"])
    assert args.overrides == SETTINGS and args.seed == 3 and str(args.out) == "runs/x"


def test_equals_form_negative_values_and_top_level_fields():
    args = parse_args(["run", "--out", "o", "--align.alpha=-2", "--warmup_ratio", "0.05", "--eval.rows", "-"])
    assert args.overrides == ["--align.alpha=-2", "--warmup_ratio=0.05", "--eval.rows=-"]
    assert parse_args(["align", "--out", "o"]).overrides == []


def test_force_on_run_and_collect_only(capsys):
    assert parse_args(["run", "--out", "o", "--force"]).force
    assert parse_args(["collect", "--out", "o", "--force"]).force
    assert not parse_args(["collect", "--out", "o"]).force
    with pytest.raises(SystemExit):
        parse_args(["phase1", "--out", "o", "--force"])
    assert "unrecognized arguments: --force" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["run", "--out", "o", "stray"], "unrecognized arguments: stray"),
    (["run", "--out", "o", "--align.alpha", "1", "stray", "--typo", "2"], "unrecognized arguments: stray --typo 2"),
    (["run", "--out", "o", "--align.alph", "3"], "unknown setting --align.alph (did you mean --align.alpha?)"),
    (["run", "--out", "o", "--align.steps", "ten"], "--align.steps: expected int, got 'ten'"),
    (["run", "--out", "o", "--align.target_layers", "9;11"], "--align.target_layers: expected list[int] | None"),
    (["run", "--out", "o", "--phase1.steps"], "--phase1.steps: expected a value (int | None)"),
    (["eval", "--adapter", "a", "--data", "d", "--align.alpha", "3"], "unrecognized arguments: --align.alpha 3"),
])
def test_bad_flags_are_argparse_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("usage: rahf-train") and f"rahf-train: error: {message}" in err


def test_main_hands_the_settings_to_the_subcommand(monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "cmd_run", seen.append)
    assert main(["run", "--out", "o", "--data", "d", *FLAGS, "--method", "dual"]) == 0
    (args,) = seen
    assert args.overrides == SETTINGS and args.method == "dual" and args.argv[-1] == "dual"


def test_open_saves_the_overrides_and_defaults_the_base(tmp_path):
    out = tmp_path / "run"
    ctx = cli._open(parse_args(["run", "--data", str(DATA), "--rows", "0:4", "--config", "tiny", "--out", str(out),
                                "--seed", "7", "--method", "dual", "--force", *FLAGS]))
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["align"]["alpha"], saved["phase1"]["steps"], saved["align"]["target_layers"]) == (10.0, 120, [9, 11, 13])
    assert saved["phase1"]["lora"]["target_modules"] == ["q_proj", "v_proj"] and saved["eval"]["rows"] == "240:300"
    assert saved["phase1"]["val_rows"] is None and saved["align"]["steps"] == 6  # the rest from tiny.yaml
    assert (saved["method"], saved["seed"]) == ("dual", 7) and ctx.config.align.alpha == 10.0
    assert ctx.force and ctx.base_spec == DEFAULT_BASE
    assert json.loads((out / "run.json").read_text())["base"] == DEFAULT_BASE
    assert "--align.alpha 10" in ctx.command


def test_an_existing_run_keeps_its_base(tmp_path):
    out = tmp_path / "run"
    cli._open(parse_args(["run", "--base", "some/base", "--data", str(DATA), "--rows", "0:4", "--out", str(out)]))
    ctx = cli._open(parse_args(["run", "--out", str(out), "--resume", "--align.steps", "2"]), resume=True)
    assert ctx.base_spec == "some/base" and not ctx.force and ctx.config.align.steps == 2
    assert yaml.safe_load((out / "config.yaml").read_text())["align"]["steps"] == 2


def test_bad_data_leaves_no_run_behind(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(DataError, match="the data has 300 rows"):
        cli._open(parse_args(["run", "--data", str(DATA), "--rows", "0:100000", "--out", str(out)]))
    assert not out.exists()
    with pytest.raises(DataError, match="cannot load preference data"):  # phase 1's mix is read up front too
        cli._open(parse_args(["run", "--data", str(DATA), "--rows", "0:4", "--out", str(out),
                              "--phase1.mix_data", str(tmp_path / "missing.jsonl")]))
    assert not out.exists()
    cli._open(parse_args(["run", "--data", str(DATA), "--rows", "0:4", "--config", "tiny", "--out", str(out)]))
    saved = (out / "run.json").read_text(), (out / "config.yaml").read_text()
    with pytest.raises(DataError, match="cannot load preference data"):
        cli._open(parse_args(["run", "--data", str(tmp_path / "missing.jsonl"), "--out", str(out),
                              "--align.steps", "99"]))
    assert ((out / "run.json").read_text(), (out / "config.yaml").read_text()) == saved
