"""Runs the CUDA kernels of csrc/cuda on the CPU, to test their logic where there is no GPU.

The .cu sources are rewritten into host C++ (host_shim.h emulates blocks, threads, barriers and
shuffles; warp_emulation.h the warp-level primitives of warp.cuh, lane by lane; wmma_emulation.h
the wmma calls with their alignment rules) and compiled with
torch.utils.cpp_extension. Their operators are registered for the CPU dispatch key, replacing the CPU
kernels, so the whole pytest suite exercises the CUDA code paths (tile loops, masks, tails, token
splits, feature tables, contractions, dtype handling) on CPU tensors:

    PYTHONPATH=csrc/cuda/emulation python -m pytest -p emulate tests/test_forward.py tests/test_masks.py

Used as a pytest plugin (-p emulate) it builds and loads the emulation after taylorshift. Slow
(one OS thread per emulated CUDA thread): use it on small shapes. What it cannot check: timing,
real warp scheduling and memory ordering beyond __syncthreads, register/shared-memory limits.
TS_EMULATION_SMEM and TS_EMULATION_SMS override the device's shared memory per block and
multiprocessor count, to reach the smaller tiles and other token splits. TS_EMULATION_WGMMA=1 builds
the kernels as nvcc's sm_90a pass does, on wgmma (in a folder of its own under the build folder).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
CUDA_DIR = HERE.parent
SOURCES = ("common.cuh", "common.cu", "direct.cu", "efficient.cu", "normalize.cu", "causal.cu")


def host_source(text: str) -> str:
    """One .cu/.cuh file rewritten for the host compiler."""
    for header in (
        "<mma.h>",
        "<ATen/cuda/CUDAContext.h>",
        "<c10/cuda/CUDAException.h>",
        "<c10/cuda/CUDAGuard.h>",
    ):
        text = text.replace(f"#include {header}", "")
    text = text.replace('#include "common.cuh"', '#include "common.cuh.h"')
    text = text.replace('#include "warp.cuh"', f'#include "{CUDA_DIR / "warp.cuh"}"')
    for header in ("features.h", "kernel_blocks.h", "kernel_checks.h", "taylorshift.h"):
        text = text.replace(f'"../{header}"', f'"{CUDA_DIR.parent / header}"')
    text = text.replace("#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800", "#if 1")
    text = text.replace(
        "extern __shared__ __align__(128) unsigned char smem[];",
        "unsigned char* smem = emu::smem;",
    )
    text = text.replace("at::cuda::getCurrentCUDAStream()", "0")
    text = text.replace("at::cuda::getCurrentDeviceProperties()", "(&emu::props)")
    text = text.replace("at::cuda::getDeviceProperties(q.get_device())", "(&emu::props)")
    text = re.sub(r"const c10::cuda::CUDAGuard guard\(.*?\)\);", "", text)
    text = text.replace(
        "TORCH_LIBRARY_IMPL(taylorshift, CUDA, m)", "TORCH_LIBRARY_IMPL(taylorshift, CPU, m)"
    )
    text = re.sub(
        r"([A-Za-z_][\w:]*(?:<[^<>;]*>)?)\s*<<<(.*?)>>>\s*\(",
        lambda m: f"emu::launch({m.group(1)}, {m.group(2)})(",
        text,
        flags=re.DOTALL,
    )
    return f'#include "{HERE / "host_shim.h"}"\n' + text


BINDINGS = """
#include <torch/extension.h>
#include "%s"
void set_props(int sms, long smem) {
  emu::props.multiProcessorCount = sms;
  emu::props.sharedMemPerBlockOptin = smem;
}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("set_props", &set_props); }
"""


def build(build_dir: str | os.PathLike | None = None):
    """Generates the host sources, compiles them, registers the operators; returns the module."""
    from torch.utils.cpp_extension import load

    build_dir = Path(
        build_dir or os.environ.get("TS_EMULATION_BUILD", "/tmp/taylorshift_emulation")
    )
    cflags = ["-std=c++20", "-O1", "-w"]
    if os.environ.get("TS_EMULATION_WGMMA") == "1":
        build_dir = build_dir / "wgmma"
        cflags.append("-DTAYLORSHIFT_EMULATE_WGMMA")
    build_dir.mkdir(parents=True, exist_ok=True)
    sources = []
    for name in SOURCES:
        target = build_dir / (name + (".h" if name.endswith(".cuh") else ".cpp"))
        text = host_source((CUDA_DIR / name).read_text())
        if not target.exists() or target.read_text() != text:  # keep ninja's timestamps
            target.write_text(text)
        if target.suffix == ".cpp":
            sources.append(str(target))
    bindings = build_dir / "bindings.cpp"
    text = BINDINGS % (HERE / "host_shim.h")
    if not bindings.exists() or bindings.read_text() != text:
        bindings.write_text(text)
    sources.append(str(bindings))
    cuda_include = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
    module = load(
        name="taylorshift_cuda_emulation",
        sources=sources,
        build_directory=str(build_dir),
        extra_cflags=[*cflags, f"-I{cuda_include}"],
        verbose=False,
    )
    module.set_props(
        int(os.environ.get("TS_EMULATION_SMS", "2")),
        int(os.environ.get("TS_EMULATION_SMEM", str(227 * 1024))),
    )
    return module


# As a pytest plugin: taylorshift first (schemas and CPU kernels), then the emulation over them.
import taylorshift  # noqa: F401

build()
