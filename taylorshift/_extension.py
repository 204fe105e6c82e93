"""Loads the compiled extension taylorshift._C, which registers the torch.ops.taylorshift operators.

Without it (a source checkout that was never built), the package still imports and computes with
the pure-PyTorch reference; one warning says so.
"""

import warnings

try:
    from taylorshift import _C
except ImportError as error:  # the extension was not built for this environment
    _C = None
    warnings.warn(
        "taylorshift: the compiled extension taylorshift._C could not be imported "
        f"({error}); falling back to the pure-PyTorch reference (slow, O(N^2) or O(N d^2) "
        "memory). Build it with `pip install --no-build-isolation .`.",
        RuntimeWarning,
        stacklevel=2,
    )

available = _C is not None
