"""The Triton backend, on the CPU under Triton's interpreter (tiny shapes; a subprocess, because
the interpreter has to be chosen before triton is imported)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


def test_triton_kernels_under_interpreter():
    script = Path(__file__).with_name("_triton_checks.py")
    env = dict(os.environ, TRITON_INTERPRET="1", BATCHNORM_TRITON="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "checks passed" in proc.stdout


@pytest.mark.parametrize("script, args, done", [
    ("gpu_profile.py", ["--shape", "3,5,7,9", "--calls", "1", "--pass", "train"], "profiled"),
    ("gpu_tile_sweep.py", ["--shape", "2,3,4,5"], "dry run: every setting ran"),
])
def test_gpu_scripts_dry_run(script, args, done):
    """The device scripts of benchmarks/gpu_checks.sh run end to end on a tiny bfloat16 tensor under
    the interpreter, so that a short GPU lease is not spent on a script the last API change broke."""
    path = Path(__file__).parents[2] / "benchmarks" / script
    env = dict(os.environ, TRITON_INTERPRET="1", BATCHNORM_TRITON="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(path), "--device", "cpu", "--dtype", "bfloat16", *args],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1] == done, proc.stdout[-2000:]


def test_triton_kernels_compile_for_sm90():
    """Every kernel's variants compile for an H100/H200 (Triton's bundled ptxas; nothing runs)."""
    script = Path(__file__).with_name("_triton_compile.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "compile checks passed" in proc.stdout


def test_triton_not_registered_without_gpu_or_interpreter():
    import torch

    import batchnorm

    if torch.cuda.is_available() or os.environ.get("BATCHNORM_TRITON") == "1":
        pytest.skip("a GPU (or the interpreter) is present")
    assert "triton" not in batchnorm.available_backends()
