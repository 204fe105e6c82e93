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
    except ValueError as error:
        result["efficient_causal"] = str(error)
    # With M = N the causal efficient form is the direct reference's function.
    out = taylorshift.taylor_shift_attention(q, q, q, t, causal=True, mode="efficient")
    errors["efficient causal"] = (out - reference.direct(q, q, q, t, causal=True)).abs().max().item()
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
    assert "requires as many queries as keys (M = N)" in fallback["efficient_causal"]
    assert "needs the compiled extension" in fallback["crossover"]


# ---- one front door: the same checks with and without the extension ----------------------------


def run_hidden(code: str, *, hide_extension: bool) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter, with taylorshift._C importable or hidden."""
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    hide = 'import sys; sys.modules["taylorshift._C"] = None\n' if hide_extension else ""
    return subprocess.run(
        [sys.executable, "-W", "ignore::RuntimeWarning", "-c", hide + code],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_bad_input_suite_passes_without_the_extension():
    code = (
        "import sys, pytest\n"
        "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', 'tests/test_bad_input.py']))\n"
    )
    completed = run_hidden(code, hide_extension=True)
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-2000:]
    assert " passed" in completed.stdout and "skipped" not in completed.stdout


# Bad calls of taylor_shift_attention, one per check of the operator; each prints the exception's
# type and message, which must be the same with and without the extension.
BAD_CALLS = textwrap.dedent(
    """
    import json, torch
    import taylorshift
    from taylorshift import _extension

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, w, generator=g, dtype=torch.float64) for n, w in ((5, 4), (7, 4), (7, 6)))
    t = torch.ones(3, dtype=torch.float64)
    f = taylorshift.taylor_shift_attention
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    calls = {
        "ndim": lambda: f(q[0], k, v),
        "int": lambda: f(q.long(), k.long(), v.long()),
        "dtypes": lambda: f(q, k.float(), v),
        "device": lambda: f(q, k.to("meta"), v.to("meta")),
        "batch": lambda: f(q[:1], k, v),
        "heads": lambda: f(q[:, :2], k, v),
        "keys": lambda: f(q, k, v[:, :, :-1]),
        "head dim": lambda: f(q[..., :-1], k, v),
        "no keys": lambda: f(q, k[:, :, :0], v[:, :, :0]),
        "value dim": lambda: f(q, k, v[..., :0]),
        "a": lambda: f(q, k, v, coefficients=(-0.5, 1.0, 1.0)),
        "c": lambda: f(q, k, v, coefficients=(0.5, 1.0, 0.1)),
        "c float32": lambda: f(q.float(), k.float(), v.float(), coefficients=(0.5, 1, 0.5 + 1e-9)),
        "inf": lambda: f(q, k, v, coefficients=(0.5, 1.0, float("inf"))),
        "1e300": lambda: f(q.half(), k.half(), v.half(), coefficients=(1e300, 1.0, 1.0)),
        "mode": lambda: f(q, k, v, mode="fast"),
        "scale": lambda: f(q, k, v, scale=0.5),
        "temperature shape": lambda: f(q, k, v, torch.ones(1, dtype=torch.float64)),
        "temperature dtype": lambda: f(q, k, v, torch.ones(3, dtype=torch.long)),
        "temperature device": lambda: f(q, k, v, t.to("meta")),
        "kpm dtype": lambda: f(q, k, v, key_padding_mask=kpm.float()),
        "kpm transposed": lambda: f(q, k, v, key_padding_mask=kpm.T),
        "kpm device": lambda: f(q, k, v, key_padding_mask=kpm.to("meta")),
        "attn int": lambda: f(q, k, v, attn_mask=torch.zeros(5, 7, dtype=torch.long)),
        "attn bias efficient": lambda: f(q, k, v, attn_mask=torch.zeros(5, 7), mode="efficient"),
        "attn shape": lambda: f(q, k, v, attn_mask=torch.zeros(7, 5, dtype=torch.bool)),
        "attn device": lambda: f(q, k, v, attn_mask=torch.zeros(5, 7, dtype=torch.bool, device="meta")),
        "efficient causal": lambda: f(q, k, v, causal=True, mode="efficient"),
    }
    outcomes = {}
    for name, call in calls.items():
        try:
            call()
            outcomes[name] = "no error"
        except Exception as error:
            outcomes[name] = [type(error).__name__, str(error).splitlines()[0]]
    print("RESULT" + json.dumps({"compiled": _extension.available, "outcomes": outcomes}))
    """
)


def bad_call_outcomes(hide_extension: bool) -> dict:
    completed = run_hidden(BAD_CALLS, hide_extension=hide_extension)
    assert completed.returncode == 0, completed.stderr
    line = next(x for x in completed.stdout.splitlines() if x.startswith("RESULT"))
    result = json.loads(line[len("RESULT") :])
    assert result["compiled"] is not hide_extension
    return result["outcomes"]


def test_same_exceptions_and_messages_with_and_without_the_extension():
    compiled, fallback = bad_call_outcomes(False), bad_call_outcomes(True)
    assert all(outcome != "no error" for outcome in compiled.values()), compiled
    differences = {
        name: (compiled[name], fallback[name])
        for name in compiled
        if compiled[name] != fallback[name]
    }
    assert not differences, differences
