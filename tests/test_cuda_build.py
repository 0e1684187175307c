"""The CUDA extension's build rules and its Python face, on a machine without a GPU.

Whether every .cu file compiles is proven by CI's `FASTVQ_CUDA=ON pip install .` step; here
CMake is only *configured* (a few seconds) to check the FASTVQ_CUDA / FASTVQ_CUDA_ARCHS rules,
and the built extension (if this install has it) is checked up to the point a GPU is needed.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastvq import dispatch

ROOT = Path(__file__).resolve().parents[1]
CMAKE = shutil.which("cmake")
requires_cmake = pytest.mark.skipif(CMAKE is None, reason="cmake is not on PATH")


def configure(tmp_path: Path, *defines: str, hide_nvcc: bool) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if hide_nvcc:  # a PATH with no nvcc on it, and no CUDACXX
        env.pop("CUDACXX", None)
        env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                      if p and not (Path(p) / "nvcc").exists())
    command = [CMAKE, "-S", str(ROOT), "-B", str(tmp_path / "build"), f"-DPython_EXECUTABLE={sys.executable}",
               *(f"-D{define}" for define in defines)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@requires_cmake
def test_cuda_on_without_nvcc_fails_with_a_clear_message(tmp_path):
    result = configure(tmp_path, "FASTVQ_CUDA=ON", hide_nvcc=True)
    assert result.returncode != 0
    assert "FASTVQ_CUDA=ON but no CUDA compiler was found" in " ".join((result.stdout + result.stderr).split())


@requires_cmake
def test_cuda_auto_without_nvcc_configures_the_cpu_build(tmp_path):
    result = configure(tmp_path, "FASTVQ_CUDA=AUTO", hide_nvcc=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no CUDA compiler found: fastvq/_cuda is not built" in result.stdout


@requires_cmake
def test_native_architectures_are_refused(tmp_path):
    result = configure(tmp_path, "FASTVQ_CUDA=OFF", "FASTVQ_CUDA_ARCHS=80;native", hide_nvcc=True)
    assert result.returncode != 0
    assert "'native' is refused" in " ".join((result.stdout + result.stderr).split())


def test_cuda_backend_explains_itself():
    backend = dispatch.get_backend("cuda")
    reasons = backend.not_supported_reasons(torch.empty(1, 1))
    assert reasons, "the cuda backend must never accept CPU tensors"
    if backend.unavailable_reason() is None:
        assert reasons == ["device cpu: the cuda backend needs CUDA tensors"]
    else:
        assert reasons == [backend.unavailable_reason()]
        assert "fastvq._cuda" in reasons[0] or "no CUDA device" in reasons[0]


def test_built_extension_checks_arguments_before_touching_a_gpu():
    cuda = pytest.importorskip("fastvq._cuda", reason="this install was built without the CUDA extension")
    assert cuda.built_archs() and cuda.runtime_version()
    x = torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"^x must be a CUDA tensor, got device cpu$"):
        cuda.nearest_code(x, torch.zeros(2, 4), torch.zeros(4), torch.zeros(2), torch.zeros(3, dtype=torch.int64),
                          torch.zeros(3), torch.zeros(1, dtype=torch.int64), stream=0)
    with pytest.raises(TypeError):  # the stream is keyword-only
        cuda.ema_stats(x, torch.zeros(3, dtype=torch.int64), torch.zeros(2), torch.zeros(2, 4), 0)
