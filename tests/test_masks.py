"""key_padding_mask, attn_mask (bool, broadcast shapes), causal, their combinations, and the
behaviour of masked keys and of rows whose keys are all masked."""

import pytest
import torch
from ts_testing import (
    F64_TOL,
    LOW_PRECISION,
    MODES,
    assert_matches_reference,
    attention,
    make_inputs,
    random_attn_mask,
    random_key_padding_mask,
)

from taylorshift import _extension

B, H, M, N, D, E = 2, 3, 65, 70, 8, 5


@pytest.mark.parametrize("mode", MODES + ("auto",))
def test_key_padding_mask(device, mode):
    q, k, v, t = make_inputs(B, H, M, 257, D, E, device=device)
    mask = random_key_padding_mask(B, 257, device=device)
    out = attention(q, k, v, t, key_padding_mask=mask, mode=mode)
    assert_matches_reference(out, q, k, v, t, key_padding_mask=mask, mode=mode)


ATTN_MASK_SHAPES = [(M, N), (1, N), (B, 1, M, N), (B, H, M, N), (1, H, 1, N), (H, M, N)]


@pytest.mark.parametrize("shape", ATTN_MASK_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", ["direct", "auto"])
def test_attn_mask_shapes(device, mode, shape):
    q, k, v, t = make_inputs(B, H, M, N, D, E, device=device)
    mask = random_attn_mask(*shape, device=device)
    out = attention(q, k, v, t, attn_mask=mask, mode=mode)
    assert_matches_reference(out, q, k, v, t, attn_mask=mask, mode=mode)
    # The mask did something.
    assert (out - attention(q, k, v, t, mode=mode)).abs().max() > 1e-3


@pytest.mark.parametrize("queries, keys", [(65, 70), (70, 65), (300, 257), (1, 9), (9, 1)])
def test_causal(device, queries, keys):
    q, k, v, t = make_inputs(1, 2, queries, keys, D, E, device=device)
    out = attention(q, k, v, t, causal=True, mode="direct")
    assert_matches_reference(out, q, k, v, t, causal=True)
    # Row 0 sees key 0 only: y_0 = sqrt(1/d) v_0.
    torch.testing.assert_close(out[:, :, 0], v[:, :, 0] / D**0.5, **F64_TOL)


def test_causal_is_top_left_aligned_lower_triangle(device):
    q, k, v, t = make_inputs(1, 1, 5, 8, 4, 3, device=device)
    tril = torch.ones(5, 8, dtype=torch.bool, device=device).tril()
    causal = attention(q, k, v, t, causal=True, mode="direct")
    explicit = attention(q, k, v, t, attn_mask=~tril, mode="direct")
    torch.testing.assert_close(causal, explicit, **F64_TOL)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mode", ["direct", "auto"])
def test_all_masks_combined(device, mode, causal):
    q, k, v, t = make_inputs(B, H, M, N, D, E, device=device)
    options = {
        "key_padding_mask": random_key_padding_mask(B, N, device=device),
        "attn_mask": random_attn_mask(B, 1, M, N, device=device),
        "causal": causal,
    }
    out = attention(q, k, v, t, mode=mode, **options)
    assert_matches_reference(out, q, k, v, t, **options, mode=mode)


def test_auto_picks_direct_with_attn_mask_or_causal(device):
    # Sizes at which auto would pick the efficient algorithm without a mask...
    q, k, v, t = make_inputs(1, 2, 300, 300, 4, 4, device=device)
    assert _extension._C.prefer_efficient(300, 300, 4, 4, device)
    torch.testing.assert_close(
        attention(q, k, v, t), attention(q, k, v, t, mode="efficient"), rtol=0, atol=0
    )
    # ...with attn_mask or causal it must compute exactly what direct computes.
    mask = random_attn_mask(300, 300, device=device)
    for options in [{"attn_mask": mask}, {"causal": True}]:
        auto = attention(q, k, v, t, **options)
        torch.testing.assert_close(
            auto, attention(q, k, v, t, mode="direct", **options), rtol=0, atol=0
        )
        assert_matches_reference(auto, q, k, v, t, **options)


@pytest.mark.parametrize("mode", MODES)
def test_masked_padded_key_changes_nothing(device, mode):
    q, k, v, t = make_inputs(B, H, M, N, D, E, device=device)
    mask = random_key_padding_mask(B, N, device=device)
    before = attention(q, k, v, t, key_padding_mask=mask, mode=mode)
    k2, v2 = k.clone(), v.clone()
    padded = mask.view(B, 1, N, 1).expand(B, H, N, 1)
    k2 = torch.where(padded, 1e3 * torch.randn_like(k), k)
    v2 = torch.where(padded, -1e4 * torch.randn_like(v), v)
    after = attention(q, k2, v2, t, key_padding_mask=mask, mode=mode)
    # A masked key's weight is exactly 0, so the sums are exactly those without it.
    torch.testing.assert_close(after, before, rtol=0, atol=1e-13)
    # Dropping the padded keys altogether gives the same result too (batch 0 only).
    keep = ~mask[0]
    alone = attention(q[:1], k[:1, :, keep], v[:1, :, keep], t, mode=mode)
    torch.testing.assert_close(before[:1], alone, **F64_TOL)


def test_key_masked_by_attn_mask_changes_nothing(device):
    q, k, v, t = make_inputs(1, 2, 20, 30, D, E, device=device)
    mask = torch.zeros(20, 30, dtype=torch.bool, device=device)
    mask[:, 7] = True
    before = attention(q, k, v, t, attn_mask=mask, mode="direct")
    k[:, :, 7] *= -50
    v[:, :, 7] = 1e5
    after = attention(q, k, v, t, attn_mask=mask, mode="direct")
    torch.testing.assert_close(after, before, rtol=0, atol=1e-13)


@pytest.mark.parametrize("mode", MODES)
def test_all_masked_batch_gives_zeros_and_zero_gradients(device, mode):
    q, k, v, t = make_inputs(B, H, M, N, D, E, device=device, requires_grad=True)
    mask = random_key_padding_mask(B, N, device=device)
    mask[1] = True
    out = attention(q, k, v, t, key_padding_mask=mask, mode=mode)
    assert not out.isnan().any()
    assert (out[1] == 0).all()
    assert_matches_reference(out, q, k, v, t, key_padding_mask=mask, mode=mode)
    (out * torch.randn_like(out)).sum().backward()
    for grad in (q.grad, k.grad, v.grad, t.grad):
        assert grad.isfinite().all()
    for grad in (q.grad, k.grad, v.grad):
        assert (grad[1] == 0).all()
    assert (q.grad[0] != 0).any()


@pytest.mark.parametrize("how", ["attn_mask", "causal_and_key_padding"])
def test_all_masked_row_gives_zeros_and_finite_gradients(device, how):
    q, k, v, t = make_inputs(B, H, M, N, D, E, device=device, requires_grad=True)
    if how == "attn_mask":
        mask = random_attn_mask(B, H, M, N, device=device)
        mask[0, 1, 5] = True  # query 5 of (batch 0, head 1) may attend nothing
        options = {"attn_mask": mask}
        rows = [(0, 1, 5)]
    else:  # causal row i sees keys <= i; padding key 0 of batch 1 empties row 0 there
        mask = torch.zeros(B, N, dtype=torch.bool, device=device)
        mask[1, 0] = True
        options = {"causal": True, "key_padding_mask": mask}
        rows = [(1, h, 0) for h in range(H)]
    out = attention(q, k, v, t, mode="direct", **options)
    assert not out.isnan().any()
    for row in rows:
        assert (out[row] == 0).all()
    assert_matches_reference(out, q, k, v, t, **options)
    (out * torch.randn_like(out)).sum().backward()
    for grad in (q.grad, k.grad, v.grad, t.grad):
        assert grad.isfinite().all()
    for row in rows:
        assert (q.grad[row] == 0).all()


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_masks_low_precision(device, dtype):
    q, k, v, t = make_inputs(B, H, M, 257, D, E, dtype=dtype, device=device, seed=9)
    options = {
        "key_padding_mask": random_key_padding_mask(B, 257, device=device),
        "attn_mask": random_attn_mask(B, H, M, 257, device=device),
        "causal": True,
    }
    out = attention(q, k, v, t, mode="direct", **options)
    assert_matches_reference(out, q, k, v, t, **options)


@pytest.mark.parametrize("mode", MODES)
def test_padded_keys_get_exactly_zero_gradients(device, mode):
    q, k, v, t = make_inputs(B, H, M, 257, D, E, device=device, requires_grad=True)
    mask = random_key_padding_mask(B, 257, device=device)
    out = attention(q, k, v, t, key_padding_mask=mask, mode=mode)
    out.backward(torch.randn_like(out))
    padded = mask.view(B, 1, 257).expand(B, H, 257)
    assert (k.grad[padded] == 0).all() and (v.grad[padded] == 0).all()
    assert (k.grad[~padded] != 0).any() and (v.grad[~padded] != 0).any()


@pytest.mark.parametrize("mode", ["direct", "efficient"])
def test_non_contiguous_masks(device, mode):
    q, k, v, t = make_inputs(B, H, M, N, D, E, device=device)
    kpm = random_key_padding_mask(N, B, device=device).t()  # (B, N) view of an (N, B) tensor
    assert not kpm.is_contiguous()
    options = {"key_padding_mask": kpm}
    if mode == "direct":
        # (B, H, M, N) view of a (N, M, H, B) tensor: every stride differs from contiguous.
        options["attn_mask"] = random_attn_mask(N, M, H, B, device=device).permute(3, 2, 1, 0)
        assert not options["attn_mask"].is_contiguous()
    out = attention(q, k, v, t, mode=mode, **options)
    contiguous = {name: mask.contiguous() for name, mask in options.items()}
    torch.testing.assert_close(out, attention(q, k, v, t, mode=mode, **contiguous), rtol=0, atol=0)
    assert_matches_reference(out, q, k, v, t, **options, mode=mode)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_all_masked_rows_low_precision(device, dtype, mode):
    q, k, v, t = make_inputs(B, H, M, N, D, E, dtype=dtype, device=device, requires_grad=True)
    mask = torch.zeros(B, N, dtype=torch.bool, device=device)
    mask[0] = True
    out = attention(q, k, v, t, key_padding_mask=mask, mode=mode)
    assert (out[0] == 0).all() and out[1].isfinite().all()
    out.float().sum().backward()
    assert all(x.grad.isfinite().all() for x in (q, k, v, t))
    assert (q.grad[0] == 0).all()
