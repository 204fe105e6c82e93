"""Incremental causal decoding: taylorshift.CausalState and TaylorShiftAttention.decode_step
against causal attention over the whole sequence (the direct algorithm, float64), at the
chunked form's 128-token chunk boundaries, with padding, every option and order; and their
errors."""

import re
from pathlib import Path

import pytest
import torch
from torch import nn
from ts_testing import (
    causal_direct,
    error_bound,
    input_gradients,
    make_inputs,
    max_error,
    random_key_padding_mask,
)

from taylorshift import CausalState, TaylorShiftAttention, _extension, reference

# Both sides evaluate the same function in float64 (unit roundoff 1.1e-16) with at most a few
# hundred terms per sum: errors are ~1e-14; any mistake shows at 1e-3 or more.
TOL = {"rtol": 1e-12, "atol": 1e-12}
B, H, D, E = 2, 3, 8, 6

# Step sizes: token by token; a prompt then tokens; uneven steps whose boundaries fall on both
# sides of the 128-token chunks of the chunked form (steps of 127, 129 and 300 tokens).
SCHEDULES = {
    "tokens": [1] * 20,
    "prefill": [45] + [1] * 6,
    "uneven": [1, 5, 127, 129, 300],
}


def stepped(state, q, k, v, temperature, schedule, key_padding_mask=None):
    """The outputs of `state.step` over consecutive slices of the tokens, concatenated."""
    outs, start = [], 0
    for size in schedule:
        piece = slice(start, start + size)
        mask = None if key_padding_mask is None else key_padding_mask[:, piece]
        outs.append(state.step(q[:, :, piece], k[:, :, piece], v[:, :, piece], temperature, mask))
        start += size
    assert start == q.shape[2]
    return torch.cat(outs, dim=2)


def padding_mask(tokens, padded):
    """None, or a (B, T) mask with random padding and the first batch left-padded (its first
    5 tokens are padding, as in batched generation of prompts of different lengths): those
    queries see no key and get zeros."""
    if not padded:
        return None
    mask = random_key_padding_mask(B, tokens)
    mask[0, :5] = True
    return mask


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_steps_match_causal_attention(device, schedule, normalize, padded):
    tokens = sum(SCHEDULES[schedule])
    q, k, v, t = make_inputs(B, H, tokens, tokens, D, E)
    mask = padding_mask(tokens, padded)
    state = CausalState(B, H, D, E, dtype=torch.float64, device=device, normalize=normalize)
    on_device = [x.to(device) for x in (q, k, v, t)]
    out = stepped(state, *on_device, SCHEDULES[schedule], None if mask is None else mask.to(device))
    assert out.device == state.state.device == torch.device(device)
    expected = causal_direct(q, k, v, t, key_padding_mask=mask, normalize=normalize)
    torch.testing.assert_close(out.cpu(), expected, **TOL)
    assert state.tokens == tokens
    unpadded = tokens if mask is None else (~mask).sum(1)
    assert torch.equal(state.valid_keys.cpu(), torch.as_tensor(unpadded).expand(B))


@pytest.mark.parametrize(
    "options",
    [
        {"output_scale": False},
        {"normalize": False, "scale": 0.3},
        {"order": 1},
        {"coefficients": (0.3, -0.5, 1.0)},  # order 2, positive: c > b^2 / 4a
        {"order": 3},
        {"order": 3, "normalize": False},  # rejected: an odd order needs bounded logits
    ],
)
@pytest.mark.parametrize("with_temperature", [True, False])
def test_options_and_orders(options, with_temperature):
    schedule = [3, 126, 1, 130]
    tokens = sum(schedule)
    q, k, v, t = make_inputs(B, H, tokens, tokens, 4, E, seed=3)
    t = 0.9 * t / t.max() if with_temperature else None  # order 1 needs |temperature| <= 1
    if options.get("order") == 3 and options.get("normalize") is False:
        with pytest.raises(ValueError, match="order 3 is odd"):
            CausalState(B, H, 4, E, dtype=torch.float64, **options)
        return
    state = CausalState(B, H, 4, E, dtype=torch.float64, **options)
    out = stepped(state, q, k, v, t, schedule)
    torch.testing.assert_close(out, causal_direct(q, k, v, t, **options), **TOL)


@pytest.mark.parametrize("schedule", [[1, 5, 127, 2], [1] * 135])
def test_float32_within_pytorch_error(schedule):
    """float32 state and tokens against the float64 function, within error_bound of the error
    PyTorch makes computing causal attention in float32 (reference.direct). Token by token,
    every output reads a state that is a running sum of one rounded term per token (the chunked
    steps sum within a chunk by matmul, then across chunks): its rounding error grows like
    sqrt(tokens) times one term's (measured over 12 seeds: at most 3.5x PyTorch's direct error,
    against 2.2x with the mixed steps), so the ulp floor takes summed_terms = tokens there."""
    tokens = sum(schedule)
    q, k, v, t = make_inputs(B, H, tokens, tokens, D, E, seed=5)
    mask = padding_mask(tokens, True)
    exact = causal_direct(q, k, v, t, key_padding_mask=mask)
    q32, k32, v32, t32 = (x.float() for x in (q, k, v, t))
    state = CausalState(B, H, D, E)
    out = stepped(state, q32, k32, v32, t32, schedule, mask)
    assert out.dtype == torch.float32 and state.state.dtype == torch.float32
    pytorch = reference.direct(q32, k32, v32, t32, causal=True, key_padding_mask=mask)
    summed = tokens if max(schedule) == 1 else 1
    bound = error_bound(max_error(pytorch, exact), exact, torch.float32, summed_terms=summed)
    assert max_error(out, exact) <= bound


def test_gradients_through_steps():
    """Autograd through three steps (the state carries the graph) equals the gradients of
    causal attention, in every input and the temperature."""
    schedule = [130, 1, 9]
    tokens = sum(schedule)
    q, k, v, t = make_inputs(B, H, tokens, tokens, D, E, seed=7)
    mask = padding_mask(tokens, True)

    def decode(q, k, v, t):
        state = CausalState(B, H, D, E, dtype=torch.float64)
        return stepped(state, q, k, v, t, schedule, mask)

    ours = input_gradients(q, k, v, t, decode)
    expected = input_gradients(
        q, k, v, t, lambda q, k, v, t: causal_direct(q, k, v, t, key_padding_mask=mask)
    )
    for got, want in zip(ours, expected, strict=True):
        torch.testing.assert_close(got, want, **TOL)


def test_kernels_and_aten_form_agree():
    """On the CPU a step without gradients runs the kernels (taylorshift::causal_efficient_step),
    one that needs them the ATen form: the same outputs and state, step after step."""
    schedule = [1, 200, 1, 7]
    tokens = sum(schedule)
    q, k, v, t = make_inputs(B, H, tokens, tokens, D, E, seed=3)
    mask = padding_mask(tokens, True)
    kernels = CausalState(B, H, D, E, dtype=torch.float64)
    aten = CausalState(B, H, D, E, dtype=torch.float64)
    with torch.no_grad():
        plain = stepped(kernels, q, k, v, t, schedule, mask)
    graph = stepped(aten, q.requires_grad_(), k, v, t, schedule, mask)
    assert graph.requires_grad and not plain.requires_grad
    torch.testing.assert_close(plain, graph.detach(), **TOL)
    torch.testing.assert_close(kernels.state, aten.state.detach(), **TOL)
    assert torch.equal(kernels.valid_keys, aten.valid_keys)


def test_step_operator_opcheck():
    """The no-gradient step operator's schema, Meta kernel and fake-tensor tracing."""
    q, k, v, _ = make_inputs(B, H, 5, 5, D, E, seed=4)
    state = CausalState(B, H, D, E, dtype=torch.float64)
    state.step(q, k, v)
    q, k, v = (torch.nn.functional.normalize(x, dim=-1) for x in (q, k, v))
    args = (q, k, v, state.state, state.valid_keys, padding_mask(5, True), True, [0.5, 1.0, 1.0])
    result = torch.library.opcheck(torch.ops.taylorshift.causal_efficient_step, args)
    assert set(result.values()) == {"SUCCESS"}, result


def test_reset_detach_memory_and_to():
    q, k, v, t = make_inputs(B, H, 10, 10, D, E)
    state = CausalState(B, H, D, E, dtype=torch.float64)
    features = (D + 1) * (D + 2) // 2
    assert state.feature_count == features
    assert state.state.shape == (B, H, features, E + 1)
    memory = B * H * features * (E + 1) * 8 + B * 8
    assert state.memory_bytes == memory
    first = state.step(q, k, v, t)
    assert state.tokens == 10 and state.memory_bytes == memory  # independent of the context
    assert state.reset() is state and state.tokens == 0
    assert not state.state.any() and not state.valid_keys.any()
    torch.testing.assert_close(state.step(q, k, v, t), first, rtol=0, atol=0)

    # to(dtype=float32): the state rounds once to float32 and takes float32 tokens.
    assert state.to(dtype=torch.float32) is state
    assert state.state.dtype == torch.float32 and state.dtype == torch.float32
    q2, k2, v2, _ = make_inputs(B, H, 4, 4, D, E, seed=1)
    out = state.step(q2.float(), k2.float(), v2.float(), t.float())
    expected = causal_direct(*(torch.cat([a, b], 2) for a, b in ((q, q2), (k, k2), (v, v2))), t)
    torch.testing.assert_close(out.double(), expected[:, :, 10:], rtol=1e-5, atol=1e-5)
    assert state.to("cpu") is state and state.device == torch.device("cpu")

    # detach_ keeps the values and cuts the graph (the state sums features of the keys).
    k.requires_grad_()
    state = CausalState(B, H, D, E, dtype=torch.float64)
    state.step(q, k, v, t)
    assert state.state.requires_grad
    before = state.state.clone()
    assert state.detach_() is state and not state.state.requires_grad
    assert torch.equal(state.state, before)


def test_repr_names_the_configuration():
    text = repr(CausalState(1, 2, 4, 5, order=1))
    assert "heads=2" in text and "order=1" in text and "tokens=0" in text


# ---- errors --------------------------------------------------------------------------------


@pytest.fixture
def state64():
    return CausalState(B, H, D, E, dtype=torch.float64)


def tokens64(t=3, b=B, h=H, d=D, e=E):
    q, k, v, _ = make_inputs(b, h, t, t, d, e)
    return q, k, v


@pytest.mark.parametrize(
    "change, message",
    [
        ({"b": 3}, r"q must have shape \(B, H, T, d\) = \(2, 3, T, 8\) for this state, got \[3,"),
        ({"h": 2}, r"q must have shape \(B, H, T, d\) = \(2, 3, T, 8\)"),
        ({"d": 4}, r"q must have shape \(B, H, T, d\) = \(2, 3, T, 8\)"),
        ({"e": 5}, r"v must have shape \(B, H, T, e\) = \(2, 3, T, 6\)"),
        ({"t": 0}, r"the same T >= 1 new tokens, got T = 0"),
    ],
)
def test_shape_errors(state64, change, message):
    with pytest.raises(ValueError, match=message):
        state64.step(*tokens64(**change))


def test_token_count_and_rank_errors(state64):
    q, k, v = tokens64()
    with pytest.raises(ValueError, match=r"the same T >= 1 new tokens, got T = 3, 2, 2"):
        state64.step(q, k[:, :, :2], v[:, :, :2])
    with pytest.raises(ValueError, match=r"k must have shape \(B, H, T, d\)"):
        state64.step(q, k[0], v)
    with pytest.raises(TypeError, match="q must be a Tensor, got list"):
        state64.step([1.0], k, v)


def test_dtype_and_device_errors(state64):
    q, k, v = tokens64()
    with pytest.raises(
        TypeError, match=r"q is torch.float32 but the state was made for torch.float64"
    ):
        state64.step(q.float(), k.float(), v.float())
    with pytest.raises(TypeError, match=r"v is torch.float32 but the state"):
        state64.step(q, k, v.float())
    with pytest.raises(ValueError, match=r"k is on meta but the state is on cpu"):
        state64.step(q, k.to("meta"), v)
    mask = torch.zeros(B, 3, dtype=torch.bool)
    with pytest.raises(
        TypeError, match=r"key_padding_mask must be a bool tensor .* got torch.int64"
    ):
        state64.step(q, k, v, key_padding_mask=mask.long())
    with pytest.raises(
        ValueError, match=r"key_padding_mask must have shape \(B, T\) = \(2, 3\), got \[2, 4\]"
    ):
        state64.step(q, k, v, key_padding_mask=torch.zeros(B, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding_mask is on meta but the state is on cpu"):
        state64.step(q, k, v, key_padding_mask=mask.to("meta"))
    with pytest.raises(ValueError, match="temperature"):
        state64.step(q, k, v, torch.ones(H + 1, dtype=torch.float64))
    # A failed step leaves the state as it was.
    assert state64.tokens == 0 and not state64.state.any()


def test_construction_errors(monkeypatch):
    with pytest.raises(ValueError, match="heads must be a positive int, got 0"):
        CausalState(1, 0, 4, 4)
    with pytest.raises(TypeError, match="dtype must be float16, bfloat16, float32 or float64"):
        CausalState(1, 1, 4, 4, dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="supports orders 1 to 3 on cpu, got order 4"):
        CausalState(1, 1, 4, 4, order=4)
    with pytest.raises(ValueError, match="scale applies only with normalize=False"):
        CausalState(1, 1, 4, 4, scale=0.5)
    with pytest.raises(ValueError, match="need a > 0"):
        CausalState(1, 1, 4, 4, coefficients=(-1.0, 1.0, 1.0))
    with pytest.raises(NotImplementedError, match="orders 1 to 2 on cuda"):
        CausalState(1, 1, 4, 4, order=3).to("cuda")
    state = CausalState(1, 2, 4, 4, order=1)
    q, k, v, _ = make_inputs(1, 2, 2, 2, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"order 1 \(odd\) must be positive on the logits' range"):
        state.step(q, k, v, torch.full((2,), 2.0))  # 1 + x < 0 for x < -1
    monkeypatch.setattr(_extension, "available", False)
    with pytest.raises(RuntimeError, match="needs the compiled extension"):
        CausalState(1, 1, 4, 4)


# ---- the module ----------------------------------------------------------------------------

EMBED, HEADS = 12, 3


def module64(**kwargs):
    module = TaylorShiftAttention(EMBED, HEADS, dtype=torch.float64, **kwargs)
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            p.copy_(0.5 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return module.eval()


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("schedule", [[1] * 12, [3, 130, 1, 6]])
@pytest.mark.parametrize("padded", [False, True])
def test_module_decode_matches_causal_forward(batch_first, schedule, padded):
    tokens = sum(schedule)
    module = module64(batch_first=batch_first)
    x = torch.randn(
        B, tokens, EMBED, generator=torch.Generator().manual_seed(2), dtype=torch.float64
    )
    mask = padding_mask(tokens, padded)
    x_in = x if batch_first else x.transpose(0, 1)
    full, _ = module(x_in, x_in, x_in, key_padding_mask=mask, is_causal=True, need_weights=False)
    state = module.initial_state(B)
    assert state.dtype == torch.float64 and state.coefficients == module.coefficients
    outs, start = [], 0
    for size in schedule:
        chunk = x[:, start : start + size]
        chunk = chunk if batch_first else chunk.transpose(0, 1)
        piece = None if mask is None else mask[:, start : start + size]
        outs.append(module.decode_step(chunk, state, key_padding_mask=piece))
        start += size
    decoded = torch.cat(outs, dim=1 if batch_first else 0)
    torch.testing.assert_close(decoded, full, **TOL)
    assert state.tokens == tokens


def test_module_decode_unbatched_and_float_mask():
    module = module64()
    x = torch.randn(7, EMBED, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    mask = torch.tensor([False, True, False, False, True, False, False])
    full, _ = module(x, x, x, key_padding_mask=mask, is_causal=True, need_weights=False)
    state = module.initial_state(1)
    float_mask = torch.zeros(7, dtype=torch.float64).masked_fill(mask, float("-inf"))
    first = module.decode_step(x[:4], state, key_padding_mask=float_mask[:4])
    second = module.decode_step(x[4:], state, key_padding_mask=float_mask[4:])
    torch.testing.assert_close(torch.cat([first, second]), full, **TOL)


@pytest.mark.parametrize("mode", ["efficient", "auto"])
def test_module_is_causal_runs_the_efficient_algorithm(mode):
    """is_causal=True with mode="efficient" (linear in L; "auto" picks by cost), alone or with
    attn_mask the causal mask (nn.Transformer*'s, with its is_causal hint: the mask is dropped,
    else mode="efficient" would raise), equals direct."""
    tokens = 140
    module = module64(batch_first=True, mode=mode)
    x = torch.randn(
        B, tokens, EMBED, generator=torch.Generator().manual_seed(6), dtype=torch.float64
    )
    mask = padding_mask(tokens, True)
    direct = module64(batch_first=True, mode="direct")
    expected, _ = direct(x, x, x, key_padding_mask=mask, is_causal=True, need_weights=False)
    out, _ = module(x, x, x, key_padding_mask=mask, is_causal=True, need_weights=False)
    torch.testing.assert_close(out, expected, **TOL)
    causal_mask = nn.Transformer.generate_square_subsequent_mask(tokens, dtype=torch.float64)
    out, _ = module(
        x, x, x, key_padding_mask=mask, attn_mask=causal_mask, is_causal=True, need_weights=False
    )
    torch.testing.assert_close(out, expected, **TOL)


def test_module_non_causal_mask_with_is_causal_still_needs_direct():
    module = module64(batch_first=True, mode="efficient")
    x = torch.randn(1, 5, EMBED, dtype=torch.float64)
    other = torch.ones(5, 5, dtype=torch.bool).triu(2)  # not the causal mask
    with pytest.raises(NotImplementedError, match='attn_mask needs mode="direct"'):
        module(x, x, x, attn_mask=other, is_causal=True, need_weights=False)


def test_module_decode_gradients():
    """A training step through decode_step reaches every parameter, with the gradient of the
    causal forward."""
    module = module64(batch_first=True)
    x = torch.randn(B, 9, EMBED, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    full, _ = module(x, x, x, is_causal=True, need_weights=False)
    full.square().sum().backward()
    expected = {name: p.grad.clone() for name, p in module.named_parameters()}
    module.zero_grad()
    state = module.initial_state(B)
    out = torch.cat([module.decode_step(x[:, :5], state), module.decode_step(x[:, 5:], state)], 1)
    out.square().sum().backward()
    for name, p in module.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], **TOL, msg=name)


def test_module_decode_errors():
    module = module64(batch_first=True)
    state = module.initial_state(2)
    x = torch.zeros(3, 1, EMBED, dtype=torch.float64)
    with pytest.raises(ValueError, match="got a batch of 3 sequences but the state holds 2"):
        module.decode_step(x, state)
    with pytest.raises(
        ValueError, match=r"takes x of shape \(B, T, E\) or \(T, E\) with E = embed_dim = 12"
    ):
        module.decode_step(torch.zeros(2, 1, 5, dtype=torch.float64), state)
    with pytest.raises(ValueError, match="was not made for this module"):
        module.decode_step(x[:2], CausalState(2, HEADS, 4, 4, dtype=torch.float64, order=1))
    with pytest.raises(TypeError, match="needs a taylorshift.CausalState"):
        module.decode_step(x[:2], None)
    with pytest.raises(NotImplementedError, match="add_bias_kv or add_zero_attn"):
        module64(add_bias_kv=True).initial_state(1)
    with pytest.raises(ValueError, match="kdim == vdim == embed_dim"):
        module64(kdim=5).initial_state(1)


# ---- the README's example ------------------------------------------------------------------


def test_readme_decoding_examples_run():
    """The code blocks of the README's "Causal language models and decoding", run as written
    (each asserts its own result)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Causal language models and decoding\n", 1)[1].split("\n### ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    assert len(blocks) == 2
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})  # noqa: S102 (the README's own code)
