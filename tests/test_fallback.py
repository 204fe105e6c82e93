"""Without the compiled extension the package imports, warns once, and computes with the
reference. Run in a subprocess with taylorshift._C hidden (sys.modules entry None)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import json, sys, warnings
    sys.modules["taylorshift._C"] = None  # import of the extension now raises ImportError
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import taylorshift
        import taylorshift.functional, taylorshift.modules, taylorshift.crossover
        import importlib
        importlib.import_module("taylorshift._extension")
    import torch
    from taylorshift import reference

    result = {
        "warnings": [(w.category.__name__, str(w.message)) for w in caught
                     if "taylorshift" in str(w.message)],
        "available": taylorshift.extension_available,
        "has_op": hasattr(torch.ops.taylorshift, "attention"),
    }
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, 11, 4, generator=g, dtype=torch.float64)
    v = torch.randn(2, 3, 11, 5, generator=g, dtype=torch.float64)
    t = torch.rand(3, generator=g, dtype=torch.float64) + 0.5
    kpm = torch.rand(2, 11, generator=g) < 0.3
    kpm[1] = True
    am = torch.rand(9, 11, generator=g) < 0.3
    errors = {}
    for mode in ["direct", "efficient", "auto"]:
        out = taylorshift.taylor_shift_attention(q, k, v, t, key_padding_mask=kpm, mode=mode)
        ref = reference.direct(q, k, v, t, key_padding_mask=kpm)
        errors[mode] = (out - ref).abs().max().item()
    out = taylorshift.taylor_shift_attention(q, k, v, t, attn_mask=am, causal=True)
    errors["masks"] = (out - reference.direct(q, k, v, t, attn_mask=am, causal=True)).abs().max().item()
    out.sum().backward()
    result["grad_finite"] = bool(q.grad.isfinite().all())
    result["errors"] = errors
    module = taylorshift.TaylorShiftAttention(8, 2, batch_first=True)
    x = torch.randn(2, 5, 8)
    result["module_shape"] = list(module(x, x, x)[0].shape)
    try:
        taylorshift.taylor_shift_attention(q, k, v, causal=True, mode="efficient")
        result["efficient_causal"] = "no error"
    except NotImplementedError:
        result["efficient_causal"] = "NotImplementedError"
    try:
        taylorshift.crossover(16)
        result["crossover"] = "no error"
    except RuntimeError as error:
        result["crossover"] = str(error)
    print("RESULT" + json.dumps(result))
    """
)


@pytest.fixture(scope="module")
def fallback():
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    completed = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert completed.returncode == 0, completed.stderr
    line = next(x for x in completed.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


def test_imports_without_extension_and_warns_exactly_once(fallback):
    assert fallback["available"] is False
    assert not fallback["has_op"]
    assert len(fallback["warnings"]) == 1, fallback["warnings"]
    category, message = fallback["warnings"][0]
    assert category == "RuntimeWarning"
    assert "taylorshift._C could not be imported" in message
    assert "falling back to the pure-PyTorch reference" in message


def test_fallback_matches_reference(fallback):
    # The fallback *is* the reference (direct or efficient): float64 agreement.
    for name, error in fallback["errors"].items():
        assert error < 1e-12, name
    assert fallback["grad_finite"]
    assert fallback["module_shape"] == [2, 5, 8]


def test_fallback_errors(fallback):
    assert fallback["efficient_causal"] == "NotImplementedError"
    assert "needs the compiled extension" in fallback["crossover"]
