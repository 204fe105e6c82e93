"""Valid inputs at the edges of the number range give finite, correct results: zero vectors in
float16, norms that overflow the dtype, and NaN or inf in padded keys (which must not
contribute, in either algorithm)."""

import pytest
import torch
from ts_testing import MODES, assert_matches_reference, make_inputs

import taylorshift
from taylorshift import TaylorShiftAttention

LOW = [torch.float16, torch.bfloat16, torch.float32]


def attention(q, k, v, temperature=None, **options):
    return taylorshift.taylor_shift_attention(q, k, v, temperature, **options)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", LOW)
def test_zero_query_and_key(device, dtype, mode):
    # A clamp of the norm at 1e-12 is 0 in float16: 0 / 0 made the whole efficient output NaN.
    q, k, v, t = make_inputs(1, 2, 6, 8, 8, dtype=dtype, device=device)
    q[0, 0, 1] = 0
    k[0, 1, 5] = 0
    out = attention(q, k, v, t, mode=mode)
    assert out.isfinite().all()
    assert_matches_reference(out, q, k, v, t, mode=mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_zero_padded_key_gives_finite_gradients(device, dtype, mode):
    q, k, v, t = make_inputs(2, 2, 6, 8, 8, dtype=dtype, device=device)
    k[:, :, 6:] = 0  # padding, as a zero-padded batch holds
    mask = torch.zeros(2, 8, dtype=torch.bool, device=device)
    mask[:, 6:] = True
    for x in (q, k, v, t):
        x.requires_grad_(True)
    attention(q, k, v, t, key_padding_mask=mask, mode=mode).square().sum().backward()
    for x in (q, k, v, t):
        assert x.grad.isfinite().all()


@pytest.mark.parametrize("mode", ["direct", "efficient"])
def test_module_float16_with_zero_padding_has_finite_weight_gradients(device, mode):
    torch.manual_seed(0)
    module = TaylorShiftAttention(16, 2, batch_first=True, mode=mode, device=device)
    module = module.half()
    x = torch.randn(2, 7, 16, device=device).half()
    x[1, 4:] = 0
    padding = torch.zeros(2, 7, dtype=torch.bool, device=device)
    padding[1, 4:] = True
    out, _ = module(x, x, x, key_padding_mask=padding)
    out.float().square().sum().backward()
    for name, parameter in module.named_parameters():
        assert parameter.grad.isfinite().all(), name


# Representable, but |x|^2 overflows the dtype and (float16, d = 16) so does |x| = 4 * 3e4.
HUGE = {torch.float16: 3e4, torch.bfloat16: 1e30, torch.float32: 1e25, torch.float64: 1e200}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", list(HUGE))
def test_huge_vectors_give_the_same_cosine_logits(device, dtype, mode):
    # Cosine logits do not depend on the scale of q or k; an overflowing norm used to make
    # the query 0, so that it attended uniformly.
    q, k, v, t = make_inputs(1, 2, 5, 9, 16, dtype=dtype, device=device)
    q_unit, k_unit = q.clone(), k.clone()
    q_unit[0, 0, 2] = q[0, 0, 2].sign()
    k_unit[0, 1, ::2] = k[0, 1, ::2].sign()
    q_big, k_big = q.clone(), k.clone()
    q_big[0, 0, 2] = HUGE[dtype] * q_unit[0, 0, 2]
    k_big[0, 1, ::2] = HUGE[dtype] * k_unit[0, 1, ::2]
    out = attention(q_big, k_big, v, t, mode=mode)
    assert out.isfinite().all()
    # The same cosine logits as the unscaled sign vectors: the float64 oracle of those.
    assert_matches_reference(out, q_unit, k_unit, v, t, mode=mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
@pytest.mark.parametrize("keys", [8, 300])
def test_non_finite_padded_key_does_not_contribute(device, mode, poison, keys):
    # mode="auto" used to give a finite result at N = 8 (direct) and NaN at N = 4000
    # (efficient: psi(k) * 0 = NaN). Padded keys are zeroed by selection in both algorithms.
    q, k, v, t = make_inputs(2, 2, 5, keys, 4, device=device)
    mask = torch.zeros(2, keys, dtype=torch.bool, device=device)
    mask[0, 3] = mask[1, -1] = True
    k[0, :, 3] = poison
    k[1, 1, -1, 2] = poison
    out = attention(q, k, v, t, key_padding_mask=mask, mode=mode)
    clean = k.clone()
    clean[mask[:, None].expand(-1, 2, -1)] = 0
    assert_matches_reference(out, q, clean, v, t, mode=mode, key_padding_mask=mask)


@pytest.mark.parametrize("mode", MODES)
def test_keys_at_the_minimum_of_f_are_not_dropped(device, mode):
    # With (0.5, 1, 0.5 + 1e-9) the float32 kernels computed f(-1) = 0, so every key at x = -1
    # got weight 0 and the output was zeros; such coefficients are now rejected in float32, and
    # the closest accepted ones weigh these keys positively.
    q = torch.zeros(1, 1, 1, 4, device=device)
    q[..., 0] = 1
    k = -q.expand(1, 1, 3, 4).clone()  # every logit is exactly -1
    v = torch.randn(1, 1, 3, 2, device=device)
    with pytest.raises(ValueError, match="checked in torch.float32"):
        attention(q, k, v, coefficients=(0.5, 1.0, 0.5 + 1e-9), mode=mode)
    if mode == "direct":
        # f(-1) = c - 1/2 = 2 eps exactly in float32. (The efficient algorithm sums f's terms,
        # of size 1, one by one: at the minimum of f it cancels to a few ulps of 1 by design.)
        c = 0.5 + 2 * torch.finfo(torch.float32).eps
        out = attention(q, k, v, coefficients=(0.5, 1.0, c), mode=mode, output_scale=False)
        torch.testing.assert_close(out, v.mean(-2, keepdim=True))
