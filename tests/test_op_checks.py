"""The algorithm operators (torch.ops.taylorshift.direct_forward, direct_backward,
efficient_forward, efficient_backward) and normalize_rows_backward are public: every argument's shape, dtype and device is
checked, by the CPU, CUDA and Meta kernels alike, before a kernel reads it.

A wrongly shaped argument used to be read out of bounds (a (1, 1, 1, 1) grad_out with a 4096-token
q: SIGSEGV), so the sweep runs in a subprocess and the test asserts that the process survived and
that every call raised a Python exception."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from ts_testing import DEVICES, make_inputs

ROOT = Path(__file__).resolve().parents[1]
COEFFS = [0.5, 1.0, 1.0]

# Builds valid arguments for every operator (M = 4096 queries, so that an argument with the
# wrong shape would be read far out of bounds), then calls each operator once per tensor argument
# replaced by a wrong one: shape (1, 1, 1, 1) (or (1, 1) for masks), the wrong dtype, a shape off
# by one, and on the meta device. Prints one line per call, flushed, so
# that a crash names the call that crashed.
SWEEP = textwrap.dedent(
    """
    import json, sys, torch
    import taylorshift

    device = sys.argv[1]
    ops = torch.ops.taylorshift
    COEFFS = [0.5, 1.0, 1.0]
    B, H, M, N, d, e = 1, 2, 4096, 33, 4, 3
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, w, generator=g).to(device) for n, w in ((M, d), (N, d), (N, e)))
    kpm = torch.zeros(B, N, dtype=torch.bool, device=device)
    am = torch.zeros(B, H, M, N, dtype=torch.bool, device=device)
    out, den = ops.direct_forward(q, k, v, kpm, am, False, True, COEFFS)
    _, _, state = ops.efficient_forward(q, k, v, kpm, True, COEFFS)
    grad = torch.ones_like(out)
    calls = {
        "direct_forward": (ops.direct_forward, [q, k, v, kpm, am, False, True, COEFFS]),
        "direct_backward": (
            ops.direct_backward, [grad, q, k, v, out, den, kpm, am, False, True, COEFFS]
        ),
        "efficient_forward": (ops.efficient_forward, [q, k, v, kpm, True, COEFFS]),
        "efficient_backward": (
            ops.efficient_backward, [grad, q, k, v, out, den, state, kpm, True, COEFFS]
        ),
        "normalize_rows_backward": (ops.normalize_rows_backward, [q, q, q.new_ones(H)]),
    }

    def wrong_versions(x):
        yield "tiny", torch.zeros((1,) * x.dim(), dtype=x.dtype, device=x.device)
        other = torch.bool if x.dtype != torch.bool else torch.float32
        yield "dtype", x.to(other)
        # One entry short in a dimension that must match another argument's (v's last, e, is
        # free in the forward operators: shorten its keys instead).
        yield "short", x[:, :, :-1] if x is v else x[..., :-1]
        yield "meta", x.to("meta")

    for name, (op, args) in calls.items():
        op(*args)  # the valid call succeeds
        for position, arg in enumerate(args):
            if not isinstance(arg, torch.Tensor):
                continue
            for how, wrong in wrong_versions(arg):
                case = f"{name} argument {position} {how}"
                print("CALL " + case, flush=True)
                broken = list(args)
                broken[position] = wrong
                try:
                    op(*broken)
                    outcome = "no error"
                except Exception as error:
                    outcome = type(error).__name__
                print("DONE " + json.dumps([case, outcome]), flush=True)
        if name.startswith("normalize_rows"):
            continue  # no coefficients
        broken = list(args)
        broken[-1] = [*COEFFS[:-1], float("nan")]
        try:
            op(*broken)
            outcome = "no error"
        except Exception as error:
            outcome = type(error).__name__
        print("DONE " + json.dumps([name + " coefficient c = nan", outcome]), flush=True)
    """
)


@pytest.mark.parametrize("device", DEVICES)
def test_every_public_op_raises_for_every_wrong_argument(device):
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    completed = subprocess.run(
        [sys.executable, "-c", SWEEP, device],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    lines = completed.stdout.splitlines()
    last_call = next((x for x in reversed(lines) if x.startswith("CALL")), "none")
    assert completed.returncode == 0, (
        f"the process died with status {completed.returncode} (a negative status is a signal) "
        f"during: {last_call}\n{completed.stderr[-2000:]}"
    )
    outcomes = [json.loads(x[len("DONE ") :]) for x in lines if x.startswith("DONE ")]
    # 4 wrong versions of each tensor argument (5 + 8 + 4 + 8 + 3 of them), one nan coefficient
    # per algorithm operator.
    assert len(outcomes) == 4 * (5 + 8 + 4 + 8 + 3) + 4
    wrong = [
        (case, outcome) for case, outcome in outcomes if outcome not in ("ValueError", "TypeError")
    ]
    assert not wrong, wrong


@pytest.fixture
def qkv(device):
    q, k, v, _ = make_inputs(2, 3, 5, 7, 4, 6, device=device)
    return q, k, v


def test_messages_name_the_operator_and_the_argument(qkv):
    q, k, v = qkv
    ops = torch.ops.taylorshift
    with pytest.raises(ValueError, match=r"taylorshift::direct_forward: q, k, v must be 4-d"):
        ops.direct_forward(q[0], k, v, None, None, False, True, COEFFS)
    with pytest.raises(ValueError, match=r"efficient_forward: k must have shape \[2, 3, 7, 2\]"):
        ops.efficient_forward(q[..., :2], k, v, None, True, COEFFS)
    with pytest.raises(TypeError, match="key_padding_mask must be torch.bool, got torch.float64"):
        ops.efficient_forward(
            q, k, v, torch.zeros(2, 7, dtype=q.dtype, device=q.device), True, COEFFS
        )
    with pytest.raises(ValueError, match=r"attn_mask must have shape \[2, 3, 5, 7\], got \[5, 7\]"):
        mask = torch.zeros(5, 7, dtype=torch.bool, device=q.device)
        ops.direct_forward(q, k, v, None, mask, False, True, COEFFS)
    out, den = ops.direct_forward(q, k, v, None, None, False, True, COEFFS)
    with pytest.raises(
        ValueError, match=r"direct_backward: grad_out must have shape \[2, 3, 5, 6\]"
    ):
        ops.direct_backward(out[:1], q, k, v, out, den, None, None, False, True, COEFFS)
    with pytest.raises(
        TypeError, match="direct_backward: den must be torch.float64, got torch.float32"
    ):
        ops.direct_backward(out, q, k, v, out, den.float(), None, None, False, True, COEFFS)
    with pytest.raises(ValueError, match=r"need c > b\^2 / \(4a\)"):
        ops.efficient_forward(q, k, v, None, True, [0.5, 1.0, 0.25])
