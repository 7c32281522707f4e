"""End to end on the tiny model: both methods, the run directory, resume between phases."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from rahf_serve.models import load_base
from training.cli import main
from training.config import load_config
from training.data import load_preferences
from training.encode import encode
from training.forward import response_logprob, response_logprob_kl

from .conftest import DATA, fork_run, tiny_config, train


def events(run, phase):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r.get("phase") == phase and r.get("event") == "done"]


def test_scit_run_directory(scit_run):
    for name in ("run.json", "config.yaml", "metrics.jsonl", "phase1/scit/adapter_model.safetensors",
                 "collect/diffs.safetensors", "bundle/rahf.json", "eval/report.md",
                 "plots/loss.png", "plots/norms.png", "plots/accuracy.png"):
        assert (scit_run / name).is_file(), name
    assert not list(scit_run.glob(".*tmp-*")), "temporary phase folders left behind"
    report = (scit_run / "eval" / "report.md").read_text()
    assert "| base |" in report and "| aligned |" in report and "Greedy generations" in report
    result = json.loads((scit_run / "eval" / "eval.json").read_text())
    pref = result["preference"]
    assert pref["pairs"] == 4 and 0.0 <= pref["scores"]["aligned"]["accuracy"] <= 1.0
    assert pref["scores"]["aligned"]["vs_base"]["mcnemar"]["p_value"] <= 1.0


def test_dual_trains_good_on_chosen_and_bad_on_rejected(tiny_model_dir, tmp_path):
    cfg = tiny_config(tmp_path / "c.yaml", {"phase1": {"dual_steps": 8, "dual_lr": 0.003}})
    out = tmp_path / "run"
    train(tiny_model_dir, out, method="dual", config=cfg)
    manifest = json.loads((out / "bundle" / "rahf.json").read_text())
    assert manifest["method"] == "dual" and "good model + phase 3" in manifest["composition"]
    assert manifest["lora"]["parts"]["phase1"]["adapter"] == "good"
    # both answers of every pair are stimuli
    summary = json.loads((out / "collect" / "summary.json").read_text())
    assert summary["stimuli"] == [[i, s] for i in range(8) for s in ("chosen", "rejected")]
    base = load_base(str(tiny_model_dir), device="cpu")
    model = PeftModel.from_pretrained(base.model, str(out / "phase1" / "good"), adapter_name="good")
    model.load_adapter(str(out / "phase1" / "bad"), adapter_name="bad")
    pairs = load_preferences(str(DATA), "0:8").pairs
    tok = base.tokenizer

    def mean_ll(adapter, side):
        model.set_adapter(adapter)
        examples = [encode(tok, p.chat(), getattr(p, side), max_prompt=48, max_response=24) for p in pairs]
        with torch.no_grad():
            total, count = response_logprob(model, examples, tok.pad_token_id)
        return float(total.sum() / count.sum())

    assert mean_ll("good", "chosen") > mean_ll("bad", "chosen")
    assert mean_ll("bad", "rejected") > mean_ll("good", "rejected")


def test_kl_to_base_holds_good_nearer_the_base(tiny_model_dir, tmp_path):
    phase1 = {"dual_steps": 6, "dual_lr": 0.01}
    runs = {}
    for beta in (0.0, 4.0):
        cfg = tiny_config(tmp_path / f"c{beta}.yaml", {"phase1": {**phase1, "kl_to_base": beta}})
        runs[beta] = tmp_path / f"run-{beta}"
        train(tiny_model_dir, runs[beta], method="dual", config=cfg, command="phase1")
    steps = [r for r in map(json.loads, (runs[4.0] / "metrics.jsonl").read_text().splitlines()) if "step" in r]
    good = [r for r in steps if r["phase"] == "phase1/good"]
    assert all("kl" in r for r in good) and not any("kl" in r for r in steps if r["phase"] == "phase1/bad")
    assert good[0]["kl"] == pytest.approx(0.0, abs=1e-6) and good[-1]["kl"] > 0  # B = 0 at step 1: the base
    # "bad" does not see the term: the same seed trains it to the same weights
    bad = [load_file(runs[b] / "phase1" / "bad" / "adapter_model.safetensors") for b in runs]
    assert all(torch.equal(bad[0][k], bad[1][k]) for k in bad[0])

    base = load_base(str(tiny_model_dir), device="cpu")
    pairs = load_preferences(str(DATA), "0:8").pairs
    examples = [encode(base.tokenizer, p.chat(), p.chosen, max_prompt=48, max_response=24) for p in pairs]

    def kl_from_base(run):
        model = PeftModel.from_pretrained(base.model, str(run / "phase1" / "good"), adapter_name="good")
        with torch.no_grad():
            _, kl, n = response_logprob_kl(model, examples, base.tokenizer.pad_token_id)
        model.unload()
        return float(kl.sum() / n.sum())

    assert kl_from_base(runs[4.0]) < kl_from_base(runs[0.0])


def test_kl_to_base_is_dual_only(tiny_model_dir, tmp_path, capsys):
    cfg = tiny_config(tmp_path / "c.yaml", {"phase1": {"kl_to_base": 1.0}})
    assert main(["phase1", "--base", str(tiny_model_dir), "--data", str(DATA), "--rows", "0:8", "--method", "scit",
                 "--config", str(cfg), "--out", str(tmp_path / "run")]) != 0
    assert "kl_to_base" in capsys.readouterr().err


def test_mix_data_trains_phase1_only(tiny_model_dir, tmp_path, capsys):
    phase1 = {"dual_steps": 8, "dual_lr": 0.01}
    plain = tmp_path / "plain"
    train(tiny_model_dir, plain, method="dual", config=tiny_config(tmp_path / "p.yaml", {"phase1": phase1}),
          command="phase1")
    mixed = tmp_path / "mixed"
    cfg = tiny_config(tmp_path / "m.yaml", {"phase1": {**phase1, "mix_data": str(DATA), "mix_rows": "100:108"},
                                           "align": {"steps": 2}})
    train(tiny_model_dir, mixed, method="dual", config=cfg)
    assert "phase 1 also trains on 8 pairs from 8 rows" in capsys.readouterr().out

    # phase 1 learned the mixed rows' chosen answers; the stimuli are the run's own 8 pairs only
    base = load_base(str(tiny_model_dir), device="cpu")
    extra = load_preferences(str(DATA), "100:108").pairs
    examples = [encode(base.tokenizer, p.chat(), p.chosen, max_prompt=48, max_response=24) for p in extra]

    def mean_ll(run):
        model = PeftModel.from_pretrained(base.model, str(run / "phase1" / "good"))
        with torch.no_grad():
            total, count = response_logprob(model, examples, base.tokenizer.pad_token_id)
        model.unload()
        return float(total.sum() / count.sum())

    assert mean_ll(mixed) > mean_ll(plain)
    summary = json.loads((mixed / "collect" / "summary.json").read_text())
    assert {i for i, _ in summary["stimuli"]} == set(range(8))
    manifest = json.loads((mixed / "bundle" / "rahf.json").read_text())
    assert manifest["data"]["pairs"] == 8 and manifest["data"]["phase1_mix"]["rows"] == "100:108"
    assert manifest["steps"]["phase1"] == 8
    assert "Phase 1 also trained on" in (mixed / "bundle" / "README.md").read_text()


def test_mix_rows_may_not_overlap_the_rows_that_judge_phase1(tiny_model_dir, tmp_path, capsys):
    cfg = tiny_config(tmp_path / "c.yaml", {"phase1": {"mix_data": str(DATA), "mix_rows": "10:20",
                                                       "val_rows": "16:24"}})
    assert main(["phase1", "--base", str(tiny_model_dir), "--data", str(DATA), "--rows", "0:8", "--method", "dual",
                 "--config", str(cfg), "--out", str(tmp_path / "run")]) != 0
    err = capsys.readouterr().err
    assert "overlaps phase1.val_rows 16:24" in err
    assert not (tmp_path / "run" / "phase1").exists()


def test_kl_to_phase1_holds_phase3_near_the_phase1_model(tiny_model_dir, tmp_path):
    cfg = tiny_config(tmp_path / "c.yaml", {"phase1": {"dual_steps": 6, "dual_lr": 0.01}})
    first = tmp_path / "run-0"
    train(tiny_model_dir, first, method="dual", config=cfg, command="phase1")
    assert main(["collect", "--out", str(first)]) == 0
    runs = {0.0: first, 10.0: fork_run(first, tmp_path / "run-10")}
    for beta, run in runs.items():
        align = tiny_config(tmp_path / f"a{beta}.yaml", {"phase1": {"dual_steps": 6, "dual_lr": 0.01},
                                                         "align": {"steps": 6, "alpha": 20.0, "kl_to_phase1": beta}})
        assert main(["align", "--out", str(run), "--config", str(align)]) == 0
    steps = [r for r in map(json.loads, (runs[10.0] / "metrics.jsonl").read_text().splitlines())
             if r.get("phase") == "align" and "step" in r]
    assert all("kl" in r for r in steps) and steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # B = 0: phase 1
    assert not any("kl" in r for r in map(json.loads, (first / "metrics.jsonl").read_text().splitlines())
                   if r.get("phase") == "align" and "step" in r)

    base = load_base(str(tiny_model_dir), device="cpu")
    pairs = load_preferences(str(DATA), "0:8").pairs
    examples = [encode(base.tokenizer, p.chat(), p.chosen, max_prompt=48, max_response=24) for p in pairs]

    def logprobs(folder):
        model = PeftModel.from_pretrained(base.model, str(folder))
        with torch.no_grad():
            out = torch.cat([torch.log_softmax(model(input_ids=torch.tensor([e.input_ids])).logits[0].float(), -1)
                             [e.response_start - 1:e.response_start + e.response_len - 1] for e in examples])
        model.unload()
        return out

    good = logprobs(first / "phase1" / "good")

    def kl_from_phase1(run):  # the shipped bundle is phase 1 + phase 3 in one LoRA
        return float((good.exp() * (good - logprobs(run / "bundle"))).sum(-1).mean())

    assert kl_from_phase1(runs[10.0]) < kl_from_phase1(runs[0.0])


def test_phase1_snapshots_hold_each_adapter_part_way(tiny_model_dir, tmp_path):
    cfg = tiny_config(tmp_path / "c.yaml", {"phase1": {"dual_steps": 6, "dual_lr": 0.003, "snapshot_every": 4,
                                                            "val_rows": "8:12"}})
    out = tmp_path / "run"
    train(tiny_model_dir, out, method="dual", config=cfg, command="phase1")
    for name in ("good", "bad"):
        steps = sorted(p.name for p in (out / "snapshots" / "phase1" / name).iterdir())
        assert steps == ["step-0004", "step-0006"], steps  # every 4 steps and the last
        last = load_file(out / "snapshots" / "phase1" / name / "step-0006" / "adapter_model.safetensors")
        final = load_file(out / "phase1" / name / "adapter_model.safetensors")
        early = load_file(out / "snapshots" / "phase1" / name / "step-0004" / "adapter_model.safetensors")
        assert last.keys() == final.keys() and all(torch.equal(last[k], final[k]) for k in final)
        assert any(not torch.equal(early[k], final[k]) for k in final)
    assert not list(out.rglob(".*tmp-*")), "temporary snapshot folders left behind"

    picked = tmp_path / "picked"
    assert main(["pick-phase1", str(out), "--out", str(picked), "--step", "good=4"]) == 0
    for name, step in (("good", 4), ("bad", 6)):  # bad keeps its last step
        got = load_file(picked / "phase1" / name / "adapter_model.safetensors")
        want = load_file(out / "snapshots" / "phase1" / name / f"step-{step:04d}" / "adapter_model.safetensors")
        assert all(torch.equal(got[k], want[k]) for k in want)
    record = json.loads((picked / "phase1" / "validation.json").read_text())["history"][-1]
    assert record["snapshots"] == {"good": 4, "bad": 6} and isinstance(record["separation"], float)
    assert json.loads((picked / "phase1" / "losses.json").read_text())["good"] == \
        json.loads((out / "phase1" / "losses.json").read_text())["good"][:4]
    assert main(["run", "--out", str(picked), "--resume", "--force"]) == 0  # phases 2 and 3 on the picked phase 1
    assert (picked / "bundle" / "rahf.json").is_file()

    # The picked run's config says how its phase 1 was made: trained afresh with it, "good" stops at
    # step 4 of its 6-step schedule and equals the snapshot; "bad" trains every step.
    assert load_config(picked / "config.yaml").phase1.stop_at == ["good=4"]
    fresh = tmp_path / "fresh"
    train(tiny_model_dir, fresh, method="dual", config=picked / "config.yaml", command="phase1")
    for name, step in (("good", 4), ("bad", 6)):
        got = load_file(fresh / "phase1" / name / "adapter_model.safetensors")
        want = load_file(out / "snapshots" / "phase1" / name / f"step-{step:04d}" / "adapter_model.safetensors")
        assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want), name
    assert [len(v) for v in json.loads((fresh / "phase1" / "losses.json").read_text()).values()] == [4, 6]


def test_pick_phase1_refuses_a_step_without_a_snapshot(tiny_model_dir, tmp_path, capsys):
    cfg = tiny_config(tmp_path / "c.yaml", {"phase1": {"dual_steps": 2, "snapshot_every": 1}})
    train(tiny_model_dir, tmp_path / "run", method="dual", config=cfg, command="phase1")
    assert main(["pick-phase1", str(tmp_path / "run"), "--out", str(tmp_path / "p"), "--step", "good=3"]) == 2
    assert "no snapshot of 'good' at step 3 (it has [1, 2]" in capsys.readouterr().err
    assert main(["pick-phase1", str(tmp_path / "run"), "--out", str(tmp_path / "q"), "--step", "scit=1"]) == 2
    assert "dual has phase-1 adapters ['good', 'bad']; got ['scit']" in capsys.readouterr().err


def test_resume_after_a_kill_between_phases(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    train(tiny_model_dir, out, command="phase1")   # as if `run` died right after phase 1
    (out / ".collect.tmp-dead").mkdir()            # and mid-way through writing phase 2
    stamp = (out / "phase1" / "scit" / "adapter_model.safetensors").stat().st_mtime_ns
    assert main(["run", "--out", str(out), "--resume"]) == 0
    assert (out / "phase1" / "scit" / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    assert len(events(out, "phase1")) == 1 and len(events(out, "collect")) == 1
    assert (out / "bundle" / "adapter_model.safetensors").is_file()
    # rerunning a phase without --resume starts it afresh: a stale checkpoint is not picked up
    cfg = tiny_config(tmp_path / "c.yaml", {"align": {"steps": 2}})
    assert main(["align", "--out", str(out), "--config", str(cfg)]) == 0
    align_steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                   if r.get("phase") == "align" and "step" in r]
    assert align_steps[-2:] == [1, 2] and len(align_steps) == 6 + 2


def test_phase_order_and_resume_mismatch_are_errors(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["align", "--base", str(tiny_model_dir), "--data", str(DATA), "--rows", "0:8",
                 "--config", "tiny", "--out", str(out)]) == 2
    assert "phase 'phase1' has not finished" in capsys.readouterr().err
    assert main(["run", "--out", str(out), "--resume", "--rows", "0:9"]) == 2
    assert "differ" in capsys.readouterr().err
    assert main(["run", "--out", str(tmp_path / "nothing"), "--resume"]) == 2


def test_eval_subcommand_writes_report(scit_run, tiny_model_dir, tmp_path, capsys):
    assert main(["eval", "--adapter", str(scit_run / "bundle"), "--base", str(tiny_model_dir), "--data", str(DATA),
                 "--rows", "240:243", "--config", "tiny", "--out", str(tmp_path / "ev")]) == 0
    assert "| bundle |" in capsys.readouterr().out   # an adapter is named after its folder
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["preference"]["pairs"] == 3


@pytest.mark.slow
def test_real_model_scit_smoke(tmp_path):
    cfg = tiny_config(tmp_path / "c.yaml", {"phase1": {"steps": 1, "batch_size": 2, "micro_batch_size": 1},
                                            "align": {"steps": 2, "batch_size": 2}})
    train("smollm2-135m-instruct", tmp_path / "run", rows="0:2", config=cfg)
    manifest = json.loads((tmp_path / "run" / "bundle" / "rahf.json").read_text())
    assert manifest["layers"] == [9, 11, 13, 15, 17, 19] and manifest["base"]["fingerprint"]["num_hidden_layers"] == 30
