"""kill -9 while a bundle is being (re)written: the path never holds a half-written bundle, and
the previous one is never lost.

tests/test_bundle.py covers a write that fails with an exception (the temp dir is removed);
tests/training/test_resume.py covers kill -9 mid-phase-3 then --resume (bit-identical adapter to
an uninterrupted run). This kills a real process inside `write_bundle`, where no cleanup can run.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rahf_serve.bundle import read_bundle
from tests.helpers import random_lora_bundle

# The child rewrites the bundle with other weights and SIGKILLs itself at the named point.
CHILD = textwrap.dedent("""
    import os, signal, sys
    import rahf_serve.bundle as b
    import rahf_serve.bundle.write as w
    from safetensors.torch import load_file

    out, point = sys.argv[1], sys.argv[2]
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    if point == "mid-files":  # the weights are on disk, the steering vectors not yet
        save = w.save_file
        w.save_file = lambda *a, **k: (save(*a, **k), die()) if a[1].name == b.WEIGHTS_FILE else save(*a, **k)
    else:  # "mid-swap": the old folder moved aside, the new one not yet in place
        replace, calls = os.replace, []
        def replace_then_die(src, dst):
            calls.append(src)
            if len(calls) == 2:
                die()
            replace(src, dst)
        os.replace = replace_then_die
    state = {k: v * 2 for k, v in load_file(os.path.join(out, b.WEIGHTS_FILE)).items()}
    config = __import__("json").load(open(os.path.join(out, b.CONFIG_FILE)))
    b.write_bundle(out, adapter_config=config, lora_state=state, vectors={1: __import__("torch").ones(64)},
                   manifest={"method": "scit"})
""")


def snapshot(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.mark.parametrize("point", ["mid-files", "mid-swap"])
def test_kill_9_inside_write_bundle_never_leaves_a_partial_bundle(tiny_base, tmp_path, point):
    out = random_lora_bundle(tiny_base, tmp_path / "bundle", seed=1)
    before = snapshot(out)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(out), point], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    if point == "mid-files":
        assert snapshot(out) == before  # readers still see the complete old bundle
        read_bundle(out)
    else:
        # Killed between the two renames: the complete old bundle waits beside the path under a
        # hidden name, and the next reader (or writer) puts it back before anything else.
        assert not out.exists()
        (aside,) = tmp_path.glob(".bundle.old-*")
        assert snapshot(aside) == before
        read_bundle(out)
        assert snapshot(out) == before and not list(tmp_path.glob(".bundle.old-*"))
    # Whatever the kill left behind is dot-prefixed: not a valid adapter name, so load_dir skips it.
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["bundle"]
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".bundle.tmp-")]
    assert leftovers, "the kill should have interrupted a write in progress"
