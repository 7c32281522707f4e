"""`rahf-serve` as a user starts it: a subprocess, a port, adapters from a folder and from --adapter."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest
import torch

from app.server import build_parser
from rahf_serve.sources import split_adapter_arg
from tests.serving.conftest import free_port


@pytest.mark.parametrize("arg, expected", [
    ("kind=./out/kind-scit", ("kind", "./out/kind-scit")),
    ("./out/kind-scit/", ("kind-scit", "./out/kind-scit/")),
    ("org/rahf-kind@v1", ("rahf-kind", "org/rahf-kind@v1")),
    ("org/rahf-kind", ("rahf-kind", "org/rahf-kind")),
    ("../weird=name/x", ("x", "../weird=name/x")),
])
def test_adapter_argument(arg, expected):
    assert split_adapter_arg(arg) == expected


def test_defaults_need_no_arguments():
    args = build_parser().parse_args([])
    assert (args.base, args.adapter_dir, args.host, args.port, args.no_ui) == (
        "smollm2-135m-instruct", "adapters", "127.0.0.1", 8000, False)


def test_engine_specific_flags_are_refused_for_the_other_engine():
    from app.server import build_engine
    from rahf_serve.errors import RahfError

    with pytest.raises(RahfError, match="--max-step-slowdown only applies to the built-in engine"):
        build_engine(build_parser().parse_args(["--engine", "vllm", "--max-step-slowdown", "2"]))
    with pytest.raises(RahfError, match="--matmul-dtype only applies to the built-in engine"):
        build_engine(build_parser().parse_args(["--engine", "vllm", "--matmul-dtype", "bfloat16"]))
    with pytest.raises(RahfError, match="--kv-cache-gib only apply to --engine vllm"):
        build_engine(build_parser().parse_args(["--kv-cache-gib", "2"]))


def test_step_pacer_is_on_by_default_on_cpu_and_can_be_turned_off(lively_model_dir):
    from app.server import build_engine

    def slowdown(*flags):
        engine = build_engine(build_parser().parse_args(["--base", str(lively_model_dir), "--device", "cpu", *flags]))
        return engine.max_step_slowdown

    assert slowdown() == 1.7
    assert slowdown("--max-step-slowdown", "off") is None
    assert slowdown("--max-step-slowdown", "3") == 3.0


def test_matmul_dtype_reaches_the_forward_s_products(lively_model_dir):
    from app.server import build_engine
    from rahf_serve.errors import RahfError
    from rahf_serve.forward_kernel import forward_kernel

    def panels(*flags):
        engine = build_engine(build_parser().parse_args(["--base", str(lively_model_dir), "--device", "cpu", *flags]))
        return engine._packed.head._panels.dtype

    assert panels() == torch.float32
    kernel = forward_kernel()
    if kernel is not None and kernel.bf16:
        assert panels("--matmul-dtype", "bfloat16") == torch.bfloat16
    else:
        with pytest.raises(RahfError, match="AVX512_BF16|kernel"):
            panels("--matmul-dtype", "bfloat16")


def test_prefix_sharing_is_on_by_default_and_no_prefix_caching_turns_it_off(lively_model_dir):
    from app.server import build_engine

    def sharing(*flags):
        engine = build_engine(build_parser().parse_args(["--base", str(lively_model_dir), "--device", "cpu", *flags]))
        return engine.prefix_sharing

    assert sharing() is True
    assert sharing("--no-prefix-caching") is False


def test_lora_dtype_reaches_the_slots_or_vllm_s_engine_arguments(lively_model_dir):
    from app.server import build_engine

    def engine(*flags):
        return build_engine(build_parser().parse_args(["--base", str(lively_model_dir), "--device", "cpu", *flags]))

    assert engine()._slots.dtype == torch.float32  # the model's
    assert engine("--lora-dtype", "bfloat16")._slots.dtype == torch.bfloat16

    def vllm_lora_dtype(*flags):  # what EngineArgs would get (vLLM itself is not needed to build them)
        options = engine("--engine", "vllm", *flags).options
        return options.engine_kwargs("path", "name", "float32", 1024).get("lora_dtype", "unset")

    assert vllm_lora_dtype() == "unset"  # vLLM's own default: the model's dtype
    assert vllm_lora_dtype("--lora-dtype", "bfloat16") == torch.bfloat16
    assert vllm_lora_dtype("--lora-dtype", "float32") == torch.float32  # a name vLLM's literal leaves out


@pytest.mark.parametrize("value", ["1", "0.5", "fast"])
def test_bad_step_slowdown_is_a_usage_error(value, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--max-step-slowdown", value])
    assert "--max-step-slowdown" in capsys.readouterr().err


def test_vllm_takes_the_default_slowdown_silently():
    from app.server import _resolve_slowdown

    assert build_parser().parse_args(["--engine", "vllm"]).max_step_slowdown is None
    assert _resolve_slowdown(None, "cuda") is None and _resolve_slowdown(None, "cpu") == 1.7


def test_serves_adapter_dir_and_named_adapter(lively_model_dir, adapter_dir, tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "app.server", "--base", str(lively_model_dir), "--adapter-dir", str(adapter_dir),
           "--adapter", f"again={adapter_dir / 'kind'}", "--port", str(port), "--device", "cpu", "--no-ui",
           "--api-key", "k"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url, headers = f"http://127.0.0.1:{port}", {"Authorization": "Bearer k"}
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", headers=headers).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        models = [m["id"] for m in httpx.get(url + "/v1/models", headers=headers).json()["data"]]
        assert sorted(models[1:]) == ["again", "kind", "terse"]
        r = httpx.post(url + "/v1/completions", headers=headers, timeout=60,
                       json={"model": "again", "prompt": "hi", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    finally:
        proc.terminate()
        proc.wait(30)
