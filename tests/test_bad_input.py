"""Bad inputs raise the right exception type with a message that names the problem."""

import pytest
import torch
from ts_testing import make_inputs

import taylorshift
from taylorshift import TaylorShiftAttention

B, H, M, N, D, E = 2, 3, 5, 7, 4, 6


@pytest.fixture
def qkv(device):
    q, k, v, _ = make_inputs(B, H, M, N, D, E, device=device)
    return q, k, v


def call(q, k, v, temperature=None, **options):
    return taylorshift.taylor_shift_attention(q, k, v, temperature, **options)


@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("ndim", [3, 5])
def test_wrong_ndim(qkv, which, ndim):
    tensors = dict(zip("qkv", qkv))
    x = tensors[which]
    tensors[which] = x[0] if ndim == 3 else x.unsqueeze(0)
    with pytest.raises(ValueError, match=rf"{which} \(B, H, .*\) must have 4 dimensions"):
        call(**tensors)


def test_mismatched_batch(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="same batch size"):
        call(q, k[:1], v[:1])


def test_batch_does_not_broadcast(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="same batch size"):
        call(q[:1], k, v)


def test_mismatched_heads(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="same number of heads"):
        call(q[:, :2], k, v)


def test_mismatched_keys_between_k_and_v(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="same number of keys"):
        call(q, k, v[:, :, :-1])


def test_mismatched_head_dim(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="same head dim"):
        call(q[..., :-1], k, v)


def test_zero_keys(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"at least one key \(N = 0\)"):
        call(q, k[:, :, :0], v[:, :, :0])


def test_zero_head_dim(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="head dims must be positive"):
        call(q, k, v[..., :0])


def test_mixed_dtypes(qkv):
    q, k, v = qkv
    with pytest.raises(TypeError, match="same dtype"):
        call(q, k.float(), v)


def test_integer_inputs(qkv):
    q, k, v = qkv
    with pytest.raises(TypeError, match="must be float16, bfloat16, float32 or float64"):
        call(q.long(), k.long(), v.long())


# (N, B): a transposed mask, whose B * N elements a view would silently reinterpret.
@pytest.mark.parametrize("shape", [(B, N + 1), (B + 1, N), (N,), (B, 1, N), (N, B)])
def test_key_padding_mask_wrong_shape(qkv, shape):
    mask = torch.zeros(shape, dtype=torch.bool, device=qkv[0].device)
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(B, N\)"):
        call(*qkv, key_padding_mask=mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8, torch.int64])
def test_key_padding_mask_wrong_dtype(qkv, dtype):
    mask = torch.zeros(B, N, dtype=dtype, device=qkv[0].device)
    with pytest.raises(TypeError, match="key_padding_mask must be a bool tensor"):
        call(*qkv, key_padding_mask=mask)


def test_float_attn_mask_is_a_bias_that_efficient_mode_refuses(qkv):
    mask = torch.zeros(M, N, device=qkv[0].device)
    with pytest.raises(NotImplementedError, match="additive float attn_mask .a bias. needs"):
        call(*qkv, attn_mask=mask, mode="efficient")


def test_integer_attn_mask_is_refused(qkv):
    mask = torch.zeros(M, N, dtype=torch.int64, device=qkv[0].device)
    with pytest.raises(TypeError, match="attn_mask must be a bool tensor"):
        call(*qkv, attn_mask=mask, mode="direct")


@pytest.mark.parametrize("shape", [(M + 1, N), (N, M), (B, H, M, N, 1), (B + 1, 1, M, N)])
def test_attn_mask_not_broadcastable(qkv, shape):
    mask = torch.zeros(shape, dtype=torch.bool, device=qkv[0].device)
    with pytest.raises(ValueError, match="attn_mask must be broadcastable"):
        call(*qkv, attn_mask=mask, mode="direct")


def test_attn_mask_with_efficient_mode(qkv):
    mask = torch.zeros(M, N, dtype=torch.bool, device=qkv[0].device)
    with pytest.raises(NotImplementedError, match="attn_mask needs mode=.direct"):
        call(*qkv, attn_mask=mask, mode="efficient")


def test_causal_efficient_needs_as_many_queries_as_keys(qkv):
    with pytest.raises(
        ValueError, match=r"requires as many queries as keys \(M = N\), got M = 5, N = 7"
    ):
        call(*qkv, causal=True, mode="efficient")


@pytest.mark.parametrize(
    "coefficients, message",
    [
        ((0.0, 1.0, 1.0), "need a > 0"),
        ((-0.5, 1.0, 1.0), "need a > 0"),
        ((0.5, 1.0, 0.5), r"need c > b\^2 / \(4a\)"),  # c == b^2 / 4a: f has a zero
        ((0.5, 2.0, 1.0), r"need c > b\^2 / \(4a\)"),
        ((0.5, 1.0, -1.0), r"need c > b\^2 / \(4a\)"),
    ],
)
def test_invalid_coefficients(qkv, coefficients, message):
    with pytest.raises(ValueError, match=message):
        call(*qkv, coefficients=coefficients)


@pytest.mark.parametrize(
    "coefficients",
    [
        (0.5, 1.0, float("inf")),
        (float("inf"), 1.0, 1.0),
        (0.5, float("nan"), 1.0),
        (1e300, 1.0, 1.0),
    ],
)
def test_non_finite_coefficients(qkv, coefficients):
    # 1e300 is finite in double but not in float32, the dtype the kernels compute float16 to
    # float32 inputs in: every weight would be inf, every output NaN.
    q, k, v = (x.float() for x in qkv)
    with pytest.raises(ValueError, match="coefficients .* must be finite in torch.float32"):
        call(q, k, v, coefficients=coefficients)


def test_huge_coefficient_accepted_where_the_kernels_compute_in_float64(qkv):
    out = call(*qkv, coefficients=(1e300, 1.0, 1.0))
    assert out.isfinite().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_coefficients_checked_in_the_dtype_the_kernels_compute_in(qkv, dtype):
    # c - b^2 / 4a = 1e-9 > 0 in double, but c rounds to 0.5 in float32: f(-1) = 0 there.
    q, k, v = (x.to(dtype) for x in qkv)
    with pytest.raises(ValueError, match=r"need c > b\^2 / \(4a\).*checked in torch.float32"):
        call(q, k, v, coefficients=(0.5, 1.0, 0.5 + 1e-9))
    call(*qkv, coefficients=(0.5, 1.0, 0.5 + 1e-9))  # float64 inputs: positive there


def test_coefficients_wrong_length(qkv):
    # k + 1 coefficients for an order k from 1 to 8 (tests/test_order.py has the rest).
    for coefficients in ((0.5,), (0.5,) * 10):
        with pytest.raises(ValueError, match=r"coefficients must list the k \+ 1 coefficients"):
            call(*qkv, coefficients=coefficients)


def test_unknown_mode(qkv):
    with pytest.raises(ValueError, match='mode must be "auto", "direct" or "efficient".*fast'):
        call(*qkv, mode="fast")


@pytest.mark.parametrize("shape", [(H + 1,), (1,), (H, 1), ()])
def test_temperature_wrong_shape(qkv, shape):
    t = torch.ones(shape, dtype=torch.float64, device=qkv[0].device)
    with pytest.raises(ValueError, match=r"temperature must have shape \(H,\) = \(3,\)"):
        call(*qkv, t)


def test_temperature_integer(qkv):
    t = torch.ones(H, dtype=torch.int64, device=qkv[0].device)
    with pytest.raises(TypeError, match="temperature must be floating"):
        call(*qkv, t)


def test_scale_with_normalize(qkv):
    with pytest.raises(ValueError, match="scale applies only with normalize=False"):
        call(*qkv, scale=0.5)


# ---- module level -----------------------------------------------------------------------------


@pytest.fixture
def module_and_input(device):
    module = TaylorShiftAttention(8, 2, batch_first=True, device=device)
    x = torch.randn(2, 5, 8, device=device)
    return module, x


@pytest.mark.parametrize("value", [0.5, -1.0, float("inf"), float("nan"), -1e30])
def test_module_float_key_padding_mask_other_than_zero_or_minus_inf(module_and_input, value):
    module, x = module_and_input
    mask = torch.zeros(2, 5, device=x.device)
    mask[0, 1] = value
    with pytest.raises(ValueError, match="(?s)key_padding_mask may hold only 0.*-inf"):
        module(x, x, x, key_padding_mask=mask)


def test_module_float_attn_mask_bias_in_efficient_mode(module_and_input):
    module, x = module_and_input
    module.mode = "efficient"
    mask = torch.full((5, 5), -2.0, device=x.device)
    with pytest.raises(NotImplementedError, match="(?s)needs mode='direct' or 'auto'.*per-pair"):
        module(x, x, x, attn_mask=mask)


def test_module_integer_mask(module_and_input):
    module, x = module_and_input
    mask = torch.zeros(2, 5, dtype=torch.int64, device=x.device)
    with pytest.raises(TypeError, match="key_padding_mask must be bool or float"):
        module(x, x, x, key_padding_mask=mask)


def test_module_constructor_errors():
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        TaylorShiftAttention(10, 3)
    with pytest.raises(ValueError, match="must be positive"):
        TaylorShiftAttention(0, 1)
    with pytest.raises(ValueError, match="mode must be"):
        TaylorShiftAttention(8, 2, mode="fast")


def test_module_efficient_mode_with_attn_mask(module_and_input):
    module, x = module_and_input
    module.mode = "efficient"
    with pytest.raises(NotImplementedError, match="attn_mask needs mode=.direct"):
        module(x, x, x, attn_mask=torch.zeros(5, 5, dtype=torch.bool, device=x.device))


# The meta device stands in for "another device", so these run on CPU-only machines too.
def test_tensors_on_different_devices(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="q, k, v must be on the same device"):
        call(q, k.to("meta"), v.to("meta"))


def test_temperature_on_other_device(qkv):
    with pytest.raises(ValueError, match="temperature is on meta"):
        call(*qkv, torch.ones(H, dtype=torch.float64, device="meta"))


def test_masks_on_other_device(qkv):
    kpm = torch.zeros(B, N, dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match="key_padding_mask is on meta"):
        call(*qkv, key_padding_mask=kpm)
    attn = torch.zeros(M, N, dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match="attn_mask is on meta"):
        call(*qkv, attn_mask=attn, mode="direct")


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32])
def test_integer_attn_mask(qkv, dtype):
    mask = torch.zeros(M, N, dtype=dtype, device=qkv[0].device)
    with pytest.raises(TypeError, match="attn_mask must be a bool tensor"):
        call(*qkv, attn_mask=mask, mode="direct")
