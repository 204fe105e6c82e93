"""How far each Taylor order's attention weights are from softmax's on the same logits.

    python -m experiments.order.approximation --runs runs/order --out experiments/results/order

The logits are cosine similarities times the temperature, x = tau * q_hat . k_hat in [-tau, tau];
order k's weights are f_k(x_ij) / sum_j f_k(x_ij), f_k = sum_{n<=k} x^n / n!, softmax's
exp(x_ij) / sum_j exp(x_ij). The distance is the total variation of each query's row,
TV = 1/2 sum_j |p_ij - s_ij| in [0, 1], averaged over the queries that are not padding. Logits come from
(a) Gaussian q, k (several d, N) and (b) the trained ListOps models of experiments.order.accuracy
(their q_hat . k_hat on test items, each layer and head), over a range of temperatures and at each
model's learnt ones. An odd order is not allowed past its positivity bound on |tau| (order 1: 1,
order 3: about 1.596; taylorshift's rule): those cells are empty (NaN), not computed.
"""

import csv
import json
import math
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from taylorshift import reference

from ..lra.data import load_task
from ..lra.models.encoder import largest_temperature
from ..lra.training.batches import make_collate
from . import study_parser
from .accuracy import ARMS, SEEDS, load_trained_model, run_dir
from .plots import line_plot

ORDERS = (1, 2, 3, 4)
TEMPERATURES = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)
RANDOM_SHAPES = ((16, 128), (16, 1024), (64, 128), (64, 1024))  # (head dim d, tokens N)


def order_allowed(order: int, temperature: float) -> bool:
    return order % 2 == 0 or temperature <= largest_temperature(order)


def mean_total_variation(
    q: torch.Tensor,
    k: torch.Tensor,
    temperature: torch.Tensor,
    order: int,
    key_padding_mask: torch.Tensor | None = None,
) -> float:
    """Mean over query rows of the TV distance between order k's weights and softmax's on the
    logits temperature_h * q_hat . k_hat, in float64; q, k are (B, H, N, d) of self-attention,
    temperature (H,), key_padding_mask (B, N) True at padding, whose queries are not counted."""
    q, k, temperature = q.double(), k.double(), temperature.double()
    taylor = reference.taylor_softmax_weights(
        q,
        k,
        temperature,
        key_padding_mask=key_padding_mask,
        coefficients=reference.taylor_coefficients(order),
    )
    q_hat, k_hat = reference.logit_factors(q, k, temperature)
    allowed = reference.allowed_keys(q, k, key_padding_mask=key_padding_mask)
    logits = (q_hat @ k_hat.transpose(-1, -2)).masked_fill(~allowed, float("-inf"))
    softmax = logits.softmax(-1)
    distance = 0.5 * (taylor - softmax).abs().sum(-1)  # (B, H, M)
    rows = torch.ones_like(distance, dtype=torch.bool)
    if key_padding_mask is not None:
        rows = ~key_padding_mask[:, None, :].expand_as(distance)
    return float(distance[rows].mean())


def random_rows(temperatures=TEMPERATURES, shapes=RANDOM_SHAPES, heads=4, seed=0) -> list[dict]:
    rows = []
    generator = torch.Generator().manual_seed(seed)
    for head_dim, tokens in shapes:
        q, k = torch.randn(2, 1, heads, tokens, head_dim, generator=generator, dtype=torch.float64)
        for tau in temperatures:
            for order in ORDERS:
                tv = float("nan")
                if order_allowed(order, tau):
                    tv = mean_total_variation(q, k, torch.full((heads,), tau), order)
                rows.append(
                    {
                        "source": f"random d={head_dim} N={tokens}",
                        "temperature": tau,
                        "order": order,
                        "tv": tv,
                    }
                )
    return rows


def attention_inputs(model: torch.nn.Module, tokens: torch.Tensor) -> list[tuple]:
    """(q, k, key_padding_mask, temperature) of each TaylorShift layer on a batch, q and k as
    (B, H, N, d): the module's own input projections of the inputs it was called with."""
    captured = []

    def capture(module, args, kwargs):
        weights, biases = module.in_proj_weight.chunk(3), module.in_proj_bias.chunk(3)
        q, k = (F.linear(args[i], weights[i], biases[i]) for i in (0, 1))
        q, k = (
            x.unflatten(-1, (module.num_heads, module.head_dim)).transpose(1, 2) for x in (q, k)
        )
        captured.append((q, k, kwargs.get("key_padding_mask"), module.temperature.detach()))

    layers = [m for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    handles = [m.register_forward_pre_hook(capture, with_kwargs=True) for m in layers]
    with torch.no_grad():
        model(tokens)
    for handle in handles:
        handle.remove()
    return captured


def test_tokens(folder: Path, items: int) -> torch.Tensor:
    """The first test items of a run's data, batched as the trainer batches them."""
    config = json.loads((folder / "config.json").read_text())
    data_root = json.loads((folder / "results.json").read_text())["data_root"]
    data = load_task("listops", data_root, **config["data"])
    tokens, _ = make_collate(data.pads)([data.test[index] for index in range(items)])
    return tokens


def trained_rows(runs: Path, items: int, temperatures=TEMPERATURES) -> list[dict]:
    """Over a temperature grid (every head at tau) and at the learnt per-head temperatures."""
    rows = []
    for arm in ARMS[1:]:
        for seed in SEEDS:
            folder = run_dir(runs, arm, seed)
            if not (folder / "results.json").is_file():
                continue
            model = load_trained_model(folder)
            layers = attention_inputs(model, test_tokens(folder, items))
            source = f"trained {arm} seed {seed}"
            grid = [(tau, None) for tau in temperatures] + [(None, "learnt")]
            for tau, label in grid:
                for order in ORDERS:
                    distances = []
                    for q, k, mask, learnt in layers:
                        temperature = learnt if label else torch.full_like(learnt, tau)
                        if order_allowed(order, float(temperature.abs().max())):
                            distances.append(mean_total_variation(q, k, temperature, order, mask))
                    tv = (
                        statistics.mean(distances)
                        if len(distances) == len(layers)
                        else float("nan")
                    )
                    rows.append(
                        {"source": source, "temperature": label or tau, "order": order, "tv": tv}
                    )
    return rows


def grid_temperatures(rows: list[dict]) -> list[float]:
    return sorted({r["temperature"] for r in rows if isinstance(r["temperature"], float)})


def mean_tv(rows: list[dict], order: int, temperature, sources) -> float:
    """The mean TV of the rows of one order and temperature over the given sources; NaN where the
    order is not allowed."""
    return statistics.mean(
        r["tv"]
        for r in rows
        if r["order"] == order and r["temperature"] == temperature and r["source"] in sources
    )


def _cell(value: float) -> str:
    return "not allowed" if math.isnan(value) else f"{value:.3g}"


def grid_table(rows: list[dict], sources: list[str]) -> str:
    """Rows: order; columns: temperatures; cells: mean TV over the given sources."""
    temperatures = grid_temperatures(rows)
    lines = [
        "| order | " + " | ".join(f"τ={t:g}" for t in temperatures) + " |",
        "|---|" + "---|" * len(temperatures),
    ]
    for order in ORDERS:
        cells = [_cell(mean_tv(rows, order, t, sources)) for t in temperatures]
        lines.append(f"| {order} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def learnt_table(rows: list[dict]) -> str:
    """Rows: the trained model's order; columns: the order whose weights are compared, at that
    model's learnt temperatures; cells: mean TV over seeds (layers and heads averaged)."""
    lines = [
        "| model trained with | " + " | ".join(f"order {o} weights" for o in ORDERS) + " |",
        "|---|" + "---|" * len(ORDERS),
    ]
    for arm in ARMS[1:]:
        sources = [f"trained {arm} seed {seed}" for seed in SEEDS]
        if any(r["source"] in sources for r in rows):
            cells = [_cell(mean_tv(rows, o, "learnt", sources)) for o in ORDERS]
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_summary(rows: list[dict], out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "approximation.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["source", "temperature", "order", "tv"])
        writer.writeheader()
        writer.writerows(rows)
    random_sources = sorted({r["source"] for r in rows if r["source"].startswith("random")})
    trained_sources = sorted({r["source"] for r in rows if r["source"].startswith("trained")})
    sections = []
    for source in random_sources:
        sections.append(
            f"Gaussian q, k, {source[len('random ') :]}, H=4\n\n" + grid_table(rows, [source])
        )
    if trained_sources:
        sections.append(
            f"Trained ListOps models' cosine logits ({len(trained_sources)} models, every layer "
            "and head, first test items), every head at τ\n\n" + grid_table(rows, trained_sources)
        )
        sections.append("Trained models at their own learnt per-head |τ|\n\n" + learnt_table(rows))
    markdown = (
        "Mean total-variation distance between each Taylor order's attention weights and "
        "softmax's on the same logits (0 = equal, 1 = disjoint); 'not allowed': an odd order "
        "past its positivity bound on |τ|\n\n" + "\n\n".join(sections)
    )
    (out / "approximation.md").write_text(markdown + "\n")
    for name, sources in (("random", random_sources), ("trained", trained_sources)):
        if not sources:
            continue
        curves = {
            f"order {order}": [
                (t, tv)
                for t in grid_temperatures(rows)
                if not math.isnan(tv := mean_tv(rows, order, t, sources))
            ]
            for order in ORDERS
        }
        line_plot(
            out / f"approximation_{name}.png",
            curves,
            xlabel="temperature τ (logits in [-τ, τ])",
            ylabel="mean TV distance to softmax",
            title=f"Taylor weights vs softmax, {name} logits"
            + (f" ({len(sources)} models)" if name == "trained" else " (mean over d, N)"),
        )
    return markdown


def parse_args(argv=None):
    parser = study_parser(__doc__)
    parser.add_argument("--items", type=int, default=64, help="test items per trained model")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    rows = random_rows() + trained_rows(args.runs, args.items)
    print(write_summary(rows, args.out))


if __name__ == "__main__":
    main()
