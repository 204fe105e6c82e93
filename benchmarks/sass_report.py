"""Static report of the CUDA kernels' machine code (no GPU needed).

Compiles every csrc/cuda/*.cu for sm_80, sm_90 and sm_90a with nvcc (or takes the objects of a finished
build, --objects), reads resource usage and disassembly with cuobjdump (the toolkit's, or the
nvidia-cuda-cuobjdump wheel's) and prints one row per kernel instantiation:

    python benchmarks/sass_report.py [--arch 80 90 90a] [--dtype bf16] [--ref GIT_REV] [--out FILE]

--ref compiles csrc/ as of a git revision (extracted with git archive) instead of the work tree,
for before/after tables. --objects DIR reads DIR/**/csrc/cuda/*.o, e.g. the build/ folder of
`python setup.py build_ext --inplace` (built for TORCH_CUDA_ARCH_LIST, by default 8.0;9.0a).

Columns
  regs, stack+local (bytes per thread of stack frame and local memory: register spills live
  there), smem (static shared memory; "dyn" when the kernel takes dynamic shared memory, whose size
  the host picks at run time), CTAs/SM (bounded by registers, threads and static shared memory;
  dynamic shared memory is not counted), HMMA (static tensor-core instructions in the main loop,
  in m16n8k16 equivalents: sm_90a's HGMMA 64xNx16 counts N / 8, the share of each of the
  warpgroup's 4 warps, which each issue it once), instr/HMMA.

Main loop. A loop is the address range of a backward branch in the SASS. The main loop is the
widest loop that holds as many tensor-core instructions (HMMA) as any loop; its instructions are
counted statically, each once (nested loops once), and divided by its HMMA count. That ratio is
the number of warp-instructions the SM's schedulers issue per tensor-core instruction. A kernel
whose loops all unroll (no loop holds an HMMA) is counted whole,
prologue and epilogue included, and its HMMA count is marked "whole". A loop that holds two
variants of its body, one taken per pass (the direct kernels with an attn_mask: tiles without
per-element masks and mixed tiles, direct.cu tile_products), is counted with both, so its ratio
is their mean, and its HMMA count is twice a pass's.

Model (issue 9). An SM has 4 schedulers issuing one warp-instruction per cycle each; a kernel
whose main loop issues r instructions per m16n8k16 HMMA (2048 multiply-adds) is issue-bound at
    t = (multiply-adds / 2048) * r / (SMs * 4 * clock)
and tensor-bound at (multiply-adds * 2) / mma_sync_peak; the modelled time is the larger. On an
H200 the two meet at r = 6.5: below it the tensor work alone sets the time, so a kernel that
trades per-element FFMA for more HMMA gains only above it. The
multiply-adds are the algorithm's counted work (below), times the executed/counted HMMA factor of
the register-resident efficient kernels (PADDING, derived at their definition); the shared-memory
kernels' padding (the ones column, feature tiles) is not counted, so the model is optimistic for
them. The ratio is static:
a loop nested in the main loop (the old kernels' element-by-element feature and tile fills) runs
many times per main-loop pass but is counted once, so for such kernels the dynamic ratio, and the
modelled time, are several times larger: the modelled TFLOP/s is an upper bound. Prologues,
epilogues, memory latency and the small elementwise kernels are ignored. sm_90 objects list 1 KB
of shared memory for some kernels that declare none (the CTA's reserved shared memory); "dyn" is
only detected where that is 0. H200: 132 SMs at
1.98 GHz; mma.sync peak taken as 660 TFLOP/s (2/3 of the 989 dense bf16 TFLOP/s, which only
wgmma reaches); on sm_90a the tensor-bound time takes the HGMMA share of a kernel's tensor work at
989 TFLOP/s and the rest at 660.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMS, CLOCK_HZ, MMA_SYNC_PEAK, WGMMA_PEAK = 132, 1.98e9, 660e12, 989e12
MADDS_PER_HMMA = 16 * 8 * 16

# The issue's target shapes: direct at N = 1024, efficient at N = 65536; d = e = 64, B*H = 16.
N_DIRECT, N_EFFICIENT, D, BH = 1024, 65536, 64, 16
F = (D + 1) * (D + 2) // 2  # features of the efficient algorithm
# Counted multiply-adds per kernel (all heads). Direct: each N x N x d product is N^2 d.
# Efficient: each N x F x (e + 1) product is N F (e + 1); forward = reduce + apply (2 products),
# backward = dS reduce + dq (g = S dz) + dk (h = dS u) + dv (4 products): 12 N F (e + 1) flops in
# all, as the issue counts them.
DIRECT_PRODUCT = N_DIRECT * N_DIRECT * D * BH
EFFICIENT_PRODUCT = N_EFFICIENT * F * (D + 1) * BH
# The bfloat16 kernels each pass runs at those shapes (d = 64, no mask), by kernel name: the
# register-resident kernels where the build has them, else main's shared-memory ones (which stay
# for other dtypes and head dims).
BF16 = "__nv_bfloat16"
# The register-resident kernels, and main's shared-memory ones, which run only where a pass has
# no register-resident kernel.
RESIDENT_WORK = {
    f"direct_forward_mma_kernel<{BF16}, {D}, kKeyMask, true>": ("direct fwd", 2 * DIRECT_PRODUCT),
    f"direct_backward_kv_mma_kernel<{BF16}, {D}, kKeyMask>": ("direct bwd", 4 * DIRECT_PRODUCT),
    f"direct_backward_q_mma_kernel<{BF16}, {D}, kKeyMask>": ("direct bwd", 3 * DIRECT_PRODUCT),
    f"state_reduce_mma_kernel<{BF16}, {D}, false, false>": ("efficient fwd", EFFICIENT_PRODUCT),
    f"efficient_apply_mma_kernel<{BF16}, {D}, kAttention>": ("efficient fwd", EFFICIENT_PRODUCT),
    f"state_reduce_mma_kernel<{BF16}, {D}, true, false>": ("efficient bwd", EFFICIENT_PRODUCT),
    # run twice: dq and dk
    f"efficient_dx_tiles_kernel<{BF16}, {D}>": ("efficient bwd", 2 * EFFICIENT_PRODUCT),
    f"efficient_apply_mma_kernel<{BF16}, {D}, kValueGradient>": (
        "efficient bwd",
        EFFICIENT_PRODUCT,
    ),
}
SHARED_MEMORY_WORK = {
    f"direct_forward_kernel<{BF16}, float>": ("direct fwd", 2 * DIRECT_PRODUCT),
    f"direct_backward_kv_kernel<{BF16}, float>": ("direct bwd", 4 * DIRECT_PRODUCT),
    f"direct_backward_q_kernel<{BF16}, float>": ("direct bwd", 3 * DIRECT_PRODUCT),
    f"feature_reduce_kernel<{BF16}, float, true>": ("efficient bwd", EFFICIENT_PRODUCT),
    f"feature_reduce_kernel<{BF16}, float, false>": ("efficient fwd", EFFICIENT_PRODUCT),
    f"efficient_apply_kernel<{BF16}, float>": ("efficient fwd", EFFICIENT_PRODUCT),
    f"efficient_backward_kv_kernel<{BF16}, float>": ("efficient bwd", 2 * EFFICIENT_PRODUCT),
    f"efficient_backward_q_kernel<{BF16}, float>": ("efficient bwd", 2 * EFFICIENT_PRODUCT),
}
WORK = RESIDENT_WORK | SHARED_MEMORY_WORK


# Executed HMMA per counted HMMA of the register-resident efficient kernels at d = e = D (per 16
# tokens, all CTAs; nb = D / 16 slices, P = nb (nb + 1) / 2 block pairs of 256 features, n = e / 8
# value tiles). The model's counted work is F (e + 1) per token and product; these kernels do more
# tensor work (whole diagonal blocks, 16 x 16 instead of 136 pairs; separate z products; the z
# column as an extra n8 tile; dq and dk with their feature contraction fused into the product,
# which takes each pair (l, m) twice, as (l, m) and (m, l)), so the modelled time scales the
# HMMA count by these factors.
NB = D // 16
PAIRS = NB * (NB + 1) // 2
COUNTED_HMMA = 16 * F * (D + 1) / MADDS_PER_HMMA
PADDING = {
    # pairs 16 P n, z pairs 2 P, linear rows nb (n + 1), constant row n + 1
    f"state_reduce_mma_kernel<{BF16}, {D}, false, false>": (
        16 * PAIRS * (D // 8) + 2 * PAIRS + (NB + 1) * (D // 8 + 1)
    )
    / COUNTED_HMMA,
    # pairs with their z tile 16 P (n + 1), linear and constant rows (nb + 1) (n + 1)
    f"state_reduce_mma_kernel<{BF16}, {D}, true, false>": ((16 * PAIRS + NB + 1) * (D // 8 + 1))
    / COUNTED_HMMA,
    # 16 operand rows per step: 16 P + nb + 1 steps of n + 1 HMMA (the z tile for den)
    f"efficient_apply_mma_kernel<{BF16}, {D}, kAttention>": ((16 * PAIRS + NB + 1) * (D // 8 + 1))
    / COUNTED_HMMA,
    # dv: the same steps without the z tile
    f"efficient_apply_mma_kernel<{BF16}, {D}, kValueGradient>": ((16 * PAIRS + NB + 1) * (D // 8))
    / COUNTED_HMMA,
    # dq and dk: e + 1 pair tiles and the linear tile of nb k-steps x n HMMA each
    f"efficient_dx_tiles_kernel<{BF16}, {D}>": ((D + 2) * NB * (D // 8)) / COUNTED_HMMA,
}


def kernels_run(names: set[str]) -> set[str]:
    """The WORK kernels a pass runs: a pass with any register-resident kernel in the build runs
    only those."""
    run = set()
    for group in {g for g, _ in WORK.values()}:
        members = [n for n, (g, _) in WORK.items() if g == group and n in names]
        resident = [n for n in members if n in RESIDENT_WORK]
        run.update(resident or members)
    return run


DTYPES = {"bf16": "__nv_bfloat16", "fp16": "__half", "fp32": "float", "fp64": "double"}


@dataclass
class Kernel:
    mangled: str
    name: str = ""
    regs: int = 0
    spill: int = 0
    smem: int = 0
    dynamic_smem: bool = False
    threads: int = 128
    instructions: list = field(default_factory=list)  # (address, opcode, branch target or None)


def tool(name: str) -> str:
    """A CUDA binary: the toolkit's, else the nvidia-cuda-* wheel's."""
    for candidate in (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / name,):
        if candidate.exists():
            return str(candidate)
    import site

    for base in site.getsitepackages():
        found = glob.glob(os.path.join(base, "nvidia", "*", "bin", name))
        if found:
            return found[0]
    if shutil.which(name):
        return name
    sys.exit(f"{name} not found: pip install nvidia-cuda-cuobjdump (or install the toolkit)")


def compile_flags() -> list[str]:
    import torch

    torch_dir = Path(torch.__file__).parent
    includes = [
        torch_dir / "include",
        torch_dir / "include" / "torch" / "csrc" / "api" / "include",
        sysconfig.get_paths()["include"],
        *sorted(Path(p) for p in glob.glob(str(torch_dir.parent / "nvidia" / "*" / "include"))),
    ]
    return [
        "-O3",
        "-std=c++20",
        "-DTORCH_EXTENSION_NAME=_C",
        "-DTAYLORSHIFT_WITH_CUDA=1",
        *[f"-I{p}" for p in includes],
    ]


def build(source: Path, arch: str, workdir: Path) -> Path:
    obj = workdir / f"{source.stem}.sm_{arch}.o"
    command = [
        tool("nvcc"),
        *compile_flags(),
        f"-gencode=arch=compute_{arch},code=sm_{arch}",
        "-c",
        str(source),
        "-o",
        str(obj),
    ]
    result = subprocess.run(command, check=False, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"nvcc failed on {source}:\n{result.stderr[-4000:]}")
    return obj


RESOURCE_FUNCTION = re.compile(r"Function (\S+):")
RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def resources(obj: Path, arch: str, kernels: dict[str, Kernel]) -> None:
    text = subprocess.run(
        [tool("cuobjdump"), "-res-usage", "-arch", f"sm_{arch}", str(obj)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    current = None
    for line in text.splitlines():
        if m := RESOURCE_FUNCTION.search(line):
            current = kernels.setdefault(m.group(1), Kernel(m.group(1)))
        elif current and (m := RESOURCES.search(line)):
            current.regs = int(m.group(1))
            current.spill = int(m.group(2)) + int(m.group(4))
            current.smem = int(m.group(3))


SASS_FUNCTION = re.compile(r"Function : (\S+)")
# An opcode: upper case, but for the shape of HGMMA (HGMMA.64x72x16.F32.BF16).
SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)(.*?);")
BRANCH_TARGET = re.compile(r"(?:BRA|BRX|JMP)\b.*?(0x[0-9a-f]+)")


def disassemble(obj: Path, arch: str, kernels: dict[str, Kernel]) -> None:
    sass = subprocess.run(
        [tool("cuobjdump"), "-sass", "-arch", f"sm_{arch}", str(obj)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    current = None
    for line in sass.splitlines():
        if m := SASS_FUNCTION.search(line):
            current = kernels.setdefault(m.group(1), Kernel(m.group(1)))
        elif current and (m := SASS_LINE.search(line)):
            address, opcode = int(m.group(1), 16), m.group(2)
            target = None
            if opcode.startswith(("BRA", "BRX", "JMP")):
                t = re.search(r"(0x[0-9a-f]+)", m.group(3))
                target = int(t.group(1), 16) if t else None
            current.instructions.append((address, opcode, target))
    for kernel in kernels.values():
        # Dynamic shared memory is declared `extern __shared__` and shows as a
        # reference to the dynamic window in the symbol table; a cheap proxy:
        # the source kernels that take it all name smem through `extern`.
        kernel.dynamic_smem = kernel.smem == 0 and any(
            op.startswith(("LDS", "STS", "LDSM")) for _, op, _ in kernel.instructions
        )


def demangle(names: list[str]) -> dict[str, str]:
    out = subprocess.run(
        ["c++filt"], check=True, input="\n".join(names), capture_output=True, text=True
    )
    return dict(zip(names, out.stdout.splitlines(), strict=True))


# Enum template arguments, which demangle as casts: (MaskMode)1 -> kAttnMask.
ENUMS = {
    "MaskMode": ("kKeyMask", "kAttnMask"),  # csrc/cuda/direct.cu
    "ApplyOutput": ("kAttention", "kValueGradient"),  # csrc/cuda/efficient.cu
}


def short_name(demangled: str) -> str:
    """`void ns::(anonymous namespace)::direct_forward_kernel<__nv_bfloat16, float>(...)` ->
    `direct_forward_kernel<__nv_bfloat16, float>`."""
    name = demangled.removeprefix("void ").replace("(anonymous namespace)::", "")
    name = name.replace("taylorshift::cuda_kernels::", "")
    name = re.sub(
        r"\((\w+)\)(\d+)",
        lambda m: ENUMS[m.group(1)][int(m.group(2))] if m.group(1) in ENUMS else m.group(0),
        name,
    )
    return name.split("(", 1)[0]


HGMMA_SHAPE = re.compile(r"HGMMA\.64x(\d+)x16")


def tensor_weight(opcode: str) -> int:
    """m16n8k16 HMMA-equivalents of one warp-instruction: 1 for an HMMA, N / 8 for an HGMMA
    64xNx16 (each of the warpgroup's 4 warps issues it for its 16 rows), 0 otherwise."""
    if opcode.startswith("HMMA"):
        return 1
    if m := HGMMA_SHAPE.match(opcode):
        return int(m.group(1)) // 8
    return 0


def main_loop(kernel: Kernel) -> tuple[int, int, bool]:
    """(instructions, HMMA, whether the whole kernel was counted) of the main loop as defined in
    the module docstring."""
    loops = [
        (target, address)
        for address, _, target in kernel.instructions
        if target is not None and target <= address
    ]
    best = (0, 0, 0)  # (hmma, width, instructions)
    for start, end in loops:
        body = [op for address, op, _ in kernel.instructions if start <= address <= end]
        hmma = sum(map(tensor_weight, body))
        key = (hmma, end - start, len(body))
        if hmma > 0 and key > best:
            best = key
    if best[0] == 0:  # up to the last EXIT: the padding after it never issues
        ops = [op for _, op, _ in kernel.instructions]
        exits = [i for i, op in enumerate(ops) if op.startswith("EXIT")]
        ops = ops[: exits[-1] + 1] if exits else ops
        hmma = sum(map(tensor_weight, ops))
        return (len(ops), hmma, True) if hmma else (0, 0, False)
    return best[2], best[0], False


def ctas_per_sm(kernel: Kernel) -> int:
    """Occupancy bound from registers (allocated per warp in units of 256), threads and static
    shared memory (228 KB per SM, 1 KB reserved per CTA) on sm_80/sm_90."""
    warps = kernel.threads // 32
    regs_per_warp = (max(kernel.regs, 1) * 32 + 255) // 256 * 256
    by_regs = 65536 // (regs_per_warp * warps)
    by_threads = 2048 // kernel.threads
    by_smem = 233472 // (kernel.smem + 1024) if kernel.smem else 32
    return min(by_regs, by_threads, by_smem, 32)


def modelled_seconds(madds: float, ratio: float, wgmma_share: float = 0.0) -> float:
    issue = madds / MADDS_PER_HMMA * ratio / (SMS * 4 * CLOCK_HZ)
    tensor = 2 * madds * (wgmma_share / WGMMA_PEAK + (1 - wgmma_share) / MMA_SYNC_PEAK)
    return max(issue, tensor)


def wgmma_share(kernel: Kernel) -> float:
    """The share of the main loop's HMMA-equivalents that are HGMMA."""
    ops = [op for _, op, _ in kernel.instructions]
    total = sum(map(tensor_weight, ops))
    return sum(tensor_weight(op) for op in ops if op.startswith("HGMMA")) / total if total else 0.0


def report(
    arches: list[str],
    dtype: str,
    ref: str | None,
    files: list[str] | None = None,
    objects: Path | None = None,
) -> str:
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        root = ROOT
        if ref:
            root = Path(tmp) / "src"
            root.mkdir()
            archive = subprocess.run(
                ["git", "-C", str(ROOT), "archive", ref, "csrc"], check=True, capture_output=True
            ).stdout
            subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
        sources = sorted((root / "csrc" / "cuda").glob("*.cu"))
        if objects:
            sources = sorted(objects.glob("**/csrc/cuda/*.o"))
            if not sources:
                sys.exit(f"no csrc/cuda/*.o under {objects}")
        if files:
            sources = [s for s in sources if s.stem in files]
        for arch in arches:
            kernels: dict[str, Kernel] = {}
            for source in sources:
                obj = source if source.suffix == ".o" else build(source, arch, Path(tmp))
                found: dict[str, Kernel] = {}
                resources(obj, arch, found)
                disassemble(obj, arch, found)
                kernels.update(found)
            names = demangle(list(kernels))
            for kernel in kernels.values():
                kernel.name = short_name(names[kernel.mangled])
            lines.append(f"\n## sm_{arch} ({dtype} instantiations and untemplated kernels)\n")
            lines.append(
                "| kernel | regs | stack+local B | smem B | CTAs/SM | main-loop HMMA | instr/HMMA |"
                " modelled ms | modelled TFLOP/s |"
            )
            lines.append("|---|---|---|---|---|---|---|---|---|")
            totals: dict[str, list[float]] = {}
            modelled = kernels_run({k.name for k in kernels.values()})
            for kernel in sorted(kernels.values(), key=lambda k: k.name):
                if "<" in kernel.name and DTYPES[dtype] not in kernel.name:
                    continue
                instructions, hmma, whole = main_loop(kernel)
                ratio = instructions / hmma if hmma else None
                work = WORK.get(kernel.name) if kernel.name in modelled else None
                ms = tflops = "-"
                if work and ratio and arch.startswith("90"):
                    seconds = modelled_seconds(
                        work[1] * PADDING.get(kernel.name, 1.0), ratio, wgmma_share(kernel)
                    )
                    ms, tflops = f"{seconds * 1e3:.3f}", f"{2 * work[1] / seconds / 1e12:.0f}"
                    total = totals.setdefault(work[0], [0.0, 0.0])
                    total[0] += seconds
                    total[1] += 2 * work[1]
                lines.append(
                    f"| `{kernel.name}` | {kernel.regs} | {kernel.spill} | "
                    f"{'dyn' if kernel.dynamic_smem else kernel.smem} | {ctas_per_sm(kernel)} | "
                    f"{hmma or '-'}{' whole' if whole else ''} | "
                    f"{f'{ratio:.1f}' if ratio else '-'} | {ms} | {tflops} |"
                )
            if totals:
                lines.append("\nModelled totals on an H200 (see the model in the docstring):\n")
                lines.append("| pass | shape | modelled ms | modelled TFLOP/s |")
                lines.append("|---|---|---|---|")
                for group in sorted(totals):
                    seconds, flops = totals[group]
                    n = N_DIRECT if group.startswith("direct") else N_EFFICIENT
                    lines.append(
                        f"| {group} | N={n}, d=e={D}, B*H={BH} | {seconds * 1e3:.3f} | "
                        f"{flops / seconds / 1e12:.0f} |"
                    )
                fwd_bwd = [totals[g] for g in totals if g.startswith("efficient")]
                if fwd_bwd:
                    seconds = sum(t[0] for t in fwd_bwd)
                    counted = 12 * N_EFFICIENT * F * (D + 1) * BH
                    lines.append(
                        f"| efficient fwd+bwd (counted 12 N F (e+1)) | N={N_EFFICIENT} | "
                        f"{seconds * 1e3:.3f} | {counted / seconds / 1e12:.0f} |"
                    )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", nargs="+", default=["80", "90", "90a"])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--ref", help="git revision whose csrc/ to compile (default: work tree)")
    parser.add_argument("--files", nargs="+", help="only these csrc/cuda/*.cu stems")
    parser.add_argument("--objects", type=Path, help="read the objects of a finished build here")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    command = " ".join(["python", "benchmarks/sass_report.py", *sys.argv[1:]])
    text = f"# SASS report\n\n`{command}`\n" + report(
        args.arch, args.dtype, args.ref, args.files, args.objects
    )
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
