"""experiments/order: the model config's Taylor order, the odd orders' temperature bound and the
approximation metric (total variation to softmax)."""

import math

import pytest
import torch

import taylorshift
from experiments.lra.models import build_model
from experiments.lra.models.encoder import largest_temperature, resolve_model_config
from experiments.lra.train import parse_args
from experiments.lra.training.config import load_config, resolve, with_overrides
from experiments.order.approximation import mean_total_variation, order_allowed
from experiments.order.cost import measured_crossover
from taylorshift import reference

SMALL = {"dim": 16, "depth": 1, "heads": 2, "mlp_ratio": 2, "dropout": 0.0}


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_model_config_order_reaches_the_attention(order):
    model = build_model({**SMALL, "order": order}, 20, 32, 5, True, False)
    attention = model.encoder.blocks[0].attention.attention
    assert attention.coefficients == reference.taylor_coefficients(order)


def test_order_defaults_to_two_and_bad_orders_are_refused():
    config = resolve(load_config("listops", preset="project"))
    assert config["model"]["order"] == 2
    overridden = with_overrides(config, "model", order=parse_args(["--task", "listops",
                                "--data-root", "x", "--order", "3"]).order)  # fmt: skip
    assert resolve(overridden)["model"]["order"] == 3
    for bad in (0, 9, 2.0, True):
        with pytest.raises(ValueError, match="order"):
            resolve_model_config({**SMALL, "order": bad})


@pytest.mark.parametrize(("order", "root"), [(1, 1.0), (3, 1.5960716379833215)])
def test_largest_temperature_is_the_library_positivity_bound(order, root):
    # root: |real root| of 1 + x + x^2/2 + x^3/6, from Cardano's formula (and 1 for 1 + x).
    assert largest_temperature(order) == pytest.approx(root, rel=1e-12)
    q, k, v = torch.randn(3, 1, 2, 4, 8, dtype=torch.float64)
    for heads_at, allowed in ((root, True), (root * 1.001, False)):
        temperature = torch.tensor([0.5, heads_at], dtype=torch.float64)
        assert order_allowed(order, heads_at) == allowed
        if allowed:
            taylorshift.taylor_shift_attention(q, k, v, temperature, order=order)
        else:
            with pytest.raises(ValueError, match="positive"):
                taylorshift.taylor_shift_attention(q, k, v, temperature, order=order)


@pytest.mark.parametrize("order", [1, 3])
def test_odd_order_temperature_is_kept_inside_the_bound(order):
    model = build_model({**SMALL, "order": order}, 20, 32, 5, True, False)
    attention = model.encoder.blocks[0].attention.attention
    with torch.no_grad():
        attention.temperature.copy_(torch.tensor([5.0, -0.5]))  # as a large optimiser step would
    model(torch.randint(1, 20, (2, 12))).sum().backward()  # would raise past the bound
    bound = largest_temperature(order)
    assert bound * (1 - 2e-6) < attention.temperature[0].item() <= bound
    assert attention.temperature[1].item() == -0.5


def test_total_variation_matches_a_hand_computation_and_ignores_masked_keys():
    # Self-attention over 4 tokens, the 4th padding: each real query sees keys at cosines 1, 0, -1,
    # logits 2, 0, -2 at tau = 2; the padding query (another direction) is not counted.
    q = torch.tensor([[[[3.0, 0.0], [1.0, 0.0], [2.0, 0.0], [1.0, 1.0]]]])
    k = torch.tensor([[[[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0], [1.0, 0.0]]]])
    mask = torch.tensor([[False, False, False, True]])
    logits = (2.0, 0.0, -2.0)
    for order in (2, 4):
        f = [sum(x**n / math.factorial(n) for n in range(order + 1)) for x in logits]
        taylor = [w / sum(f) for w in f]
        softmax = [math.exp(x) / sum(math.exp(y) for y in logits) for x in logits]
        expected = 0.5 * sum(abs(p - s) for p, s in zip(taylor, softmax, strict=True))
        got = mean_total_variation(q, k, torch.tensor([2.0]), order, key_padding_mask=mask)
        assert got == pytest.approx(expected, rel=1e-12)
        assert got > 0.01  # a distance that can fail: orders 2 and 4 differ from exp at x = 2


def test_total_variation_shrinks_with_the_order_and_the_temperature():
    q, k = torch.randn(2, 1, 2, 64, 16, generator=torch.Generator().manual_seed(0))
    tv = {(order, tau): mean_total_variation(q, k, torch.full((2,), tau), order)
          for order in (2, 4) for tau in (0.5, 4.0)}  # fmt: skip
    assert tv[4, 4.0] < tv[2, 4.0]
    assert tv[2, 0.5] < tv[2, 4.0]
    assert mean_total_variation(q, k, torch.full((2,), 1e-4), 2) < 1e-8


def test_measured_crossover_interpolates_between_grid_points():
    # Order 2: efficient / direct = 2 at N = 256, 1/2 at N = 1024, so equal at 512 on log-log axes;
    # order 3: efficient always twice direct, never faster.
    times = {256: (1.0, 2.0, 2.0), 1024: (4.0, 2.0, 8.0)}  # direct, efficient 2, efficient 3
    rows = []
    for n, (direct, efficient_2, efficient_3) in times.items():
        for method, ms in [("direct 2", direct), ("direct 3", direct), ("efficient 2", efficient_2),
                           ("efficient 3", efficient_3)]:  # fmt: skip
            rows.append({"method": method, "tokens": n, "ms": ms})
    assert measured_crossover(rows, 2) == pytest.approx(512.0, rel=1e-12)
    assert measured_crossover(rows, 3) is None
