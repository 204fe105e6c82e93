"""The project / lra / paper presets: every preset trains on generated data, and the pieces that
make each one faithful (schedules, optimisers, masking, grayscale, splits, the paper's ListOps)."""

import json
import math
import random

import numpy as np
import pytest
import torch
from conftest import tiny_config, write_imdb
from PIL import Image

from experiments.lra import train
from experiments.lra.data.image import grayscale_tokens
from experiments.lra.data.listops import ListOpsBatches
from experiments.lra.data.text import load_text
from experiments.lra.generators.listops_paper import generate_tree
from experiments.lra.models import build_model
from experiments.lra.models.encoder import MODEL_DEFAULTS
from experiments.lra.training.config import TRAIN_DEFAULTS, load_config, resolve
from experiments.lra.training.schedule import learning_rate_factor, make_optimizer

PRESET_TASKS = [
    ("lra", "listops"),
    ("lra", "text"),
    ("lra", "retrieval"),
    ("lra", "image"),
    ("lra", "pathfinder"),
    ("paper", "listops"),
    ("paper", "text"),
    ("paper", "image"),
]


@pytest.mark.parametrize(("preset", "task"), PRESET_TASKS)
def test_every_preset_trains_on_generated_data(all_tasks_root, tmp_path, preset, task):
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(tiny_config(task, preset)))
    out = tmp_path / "run"
    train.main(
        ["--task", task, "--preset", preset, "--data-root", str(all_tasks_root), "--config",
         str(config_file), "--out", str(out), "--no-progress", "--log-every", "2"]
    )  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert results["preset"] == preset and results["steps"] == 6
    assert 0.0 <= results["test_accuracy"] <= 1.0
    written = json.loads((out / "config.json").read_text())
    # Fully resolved: every default is spelled out in the run's own record.
    assert set(MODEL_DEFAULTS) <= set(written["model"])
    assert set(TRAIN_DEFAULTS) <= set(written["train"])
    assert written["preset"] == preset
    expected_optimizer = {"lra": "adamw", "paper": "lamb"}[preset]
    assert written["train"]["optimizer"] == expected_optimizer


def test_paper_preset_says_which_tasks_it_lacks():
    with pytest.raises(ValueError, match="no Retrieval"):
        load_config("retrieval", preset="paper")
    with pytest.raises(ValueError, match="softmax baseline"):
        load_config("pathfinder", preset="paper")


def test_lra_preset_holds_the_published_numbers():
    listops = resolve(load_config("listops", preset="lra"))
    factor = learning_rate_factor(listops["train"])
    peak = listops["train"]["lr"] * factor(1000)
    # LRA's ListOps peak 0.05 / sqrt(1000); the project preset's is 1e-4, about 16x lower.
    assert peak == pytest.approx(0.05 / math.sqrt(1000))
    assert peak / load_config("listops")["train"]["lr"] == pytest.approx(15.8, rel=0.01)
    text = resolve(load_config("text", preset="lra"))
    assert text["train"]["lr"] * learning_rate_factor(text["train"])(8000) == pytest.approx(
        5.59e-4, rel=1e-3
    )
    for task, decay in [("listops", 0.1), ("text", 0.1), ("retrieval", 0.1), ("image", 0.0),
                        ("pathfinder", 0.0)]:  # fmt: skip
        config = resolve(load_config(task, preset="lra"))
        assert config["train"]["weight_decay"] == decay
        assert config["train"]["betas"] == [0.9, 0.98] and config["train"]["eps"] == 1e-9
        assert config["train"]["grad_clip"] is None
        assert config["model"]["masking"] == "zero_tokens" and config["model"]["head"] == "mlp"
        assert config["model"]["embedding_init_std"] == 1.0
    image = resolve(load_config("image", preset="lra"))["model"]
    assert (image["dim"], image["heads"], image["qkv_dim"], image["mlp_dim"]) == (128, 8, 64, 128)
    assert image["positions"] == "learned"


def test_lra_schedules_follow_train_utils():
    rsqrt = learning_rate_factor({**TRAIN_DEFAULTS, "schedule": "lra_rsqrt", "lr": 1.0,
                                  "warmup_steps": 100, "max_steps": 1000})  # fmt: skip
    assert rsqrt(0) == 0.0  # LRA's first update has rate 0
    assert rsqrt(50) == pytest.approx(0.5 / 10)
    assert rsqrt(400) == pytest.approx(1 / 20)
    cosine = learning_rate_factor({**TRAIN_DEFAULTS, "schedule": "lra_cosine", "lr": 1.0,
                                   "warmup_steps": 10, "max_steps": 110,
                                   "steps_per_cycle": 100})  # fmt: skip
    assert cosine(5) == pytest.approx(0.5)
    assert cosine(60) == pytest.approx(0.5)
    assert cosine(110) == pytest.approx(1.0)  # cyclic: progress % 1 restarts the cosine


def test_weight_decay_on_all_or_matrices_and_lamb():
    model = build_model({"dim": 8, "depth": 1, "heads": 2}, 10, 16, 3, True, False)
    train_config = {**TRAIN_DEFAULTS, "lr": 1e-3}
    decayed = make_optimizer(model, train_config).param_groups[0]["params"]
    assert all(p.ndim >= 2 for p in decayed)
    everything = make_optimizer(model, {**train_config, "weight_decay_on": "all"})
    assert len(everything.param_groups[0]["params"]) == len(list(model.parameters()))
    lamb = make_optimizer(model, {**train_config, "optimizer": "lamb"})
    assert type(lamb).__name__ == "Lamb" and lamb.debias


def test_models_use_the_library_attention_modules():
    from taylorshift import TaylorShiftAttention

    config = {"dim": 16, "depth": 1, "heads": 2}
    taylor = build_model({**config, "attention": "taylorshift"}, 10, 16, 3, True, False)
    softmax = build_model({**config, "attention": "softmax"}, 10, 16, 3, True, False)
    assert isinstance(taylor.encoder.blocks[0].attention.attention, TaylorShiftAttention)
    assert type(softmax.encoder.blocks[0].attention.attention) is torch.nn.MultiheadAttention


def test_narrow_qkv_matches_lra_attention_in_float64():
    """qkv_dim < dim: LRA's q, k, v = x W (dim -> qkv), softmax attention, output map qkv -> dim.
    Loading LRA-shaped weights into the wrapper reproduces that computation."""
    torch.manual_seed(0)
    dim, qkv, heads, batch, length = 12, 8, 2, 2, 5
    model = build_model(
        {"dim": dim, "qkv_dim": qkv, "depth": 1, "heads": heads, "attention": "softmax",
         "qkv_bias": False},
        10, 16, 3, True, False,
    ).double()  # fmt: skip
    layer = model.encoder.blocks[0].attention
    w_q, w_k, w_v = (torch.randn(qkv, dim, dtype=torch.float64) for _ in range(3))
    w_o = torch.randn(dim, qkv, dtype=torch.float64)
    with torch.no_grad():
        layer.query_in.weight.copy_(w_q)
        layer.attention.q_proj_weight.copy_(torch.eye(qkv))
        layer.attention.k_proj_weight.copy_(w_k)
        layer.attention.v_proj_weight.copy_(w_v)
        layer.attention.out_proj.weight.copy_(torch.eye(qkv))
        layer.out.weight.copy_(w_o)
    x = torch.randn(batch, length, dim, dtype=torch.float64)
    split = [t.view(batch, length, heads, qkv // heads).transpose(1, 2) for t in
             (x @ w_q.T, x @ w_k.T, x @ w_v.T)]  # fmt: skip
    q, k, v = split
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(qkv // heads), dim=-1)
    expected = (weights @ v).transpose(1, 2).reshape(batch, length, qkv) @ w_o.T
    torch.testing.assert_close(layer(x, None), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("attention", ["taylorshift", "softmax"])
def test_lra_masking_hides_pixel_zero_and_survives_a_black_image(attention):
    config = {"dim": 16, "depth": 1, "heads": 2, "attention": attention, "masking": "zero_tokens",
              "pooling": "mean_all"}  # fmt: skip
    model = build_model(config, 256, 16, 2, False, False).eval()
    image = torch.randint(1, 256, (2, 16))
    image[:, 5:9] = 0
    assert torch.equal(model.encoder.padding_mask(image), image == 0)
    assert (
        build_model(
            {**config, "masking": "padding"}, 256, 16, 2, False, False
        ).encoder.padding_mask(image)
        is None
    )
    # Every key masked: no keys left, so the mask is dropped (LRA's -1e10 bias gives uniform weights).
    logits = model(torch.zeros(1, 16, dtype=torch.long))
    assert torch.isfinite(logits).all()
    # Masked keys reach no token: changing what the masked (zero) tokens carry leaves the
    # first block's output at the unmasked positions unchanged.
    block_outputs = []
    model.encoder.blocks[0].register_forward_hook(lambda m, i, o: block_outputs.append(o))
    with torch.no_grad():
        model(image)
        model.encoder.embedding.weight[0] += 1.0
        model(image)
    first, second = block_outputs
    keep = image != 0
    torch.testing.assert_close(first[keep], second[keep], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(first[~keep], second[~keep])


def test_one_hot_linear_embedding_is_nn_linear_on_one_hot_rows():
    model = build_model({"dim": 6, "depth": 1, "heads": 2, "embedding": "one_hot_linear",
                         "masking": "none"}, 17, 8, 3, True, False)  # fmt: skip
    encoder = model.encoder
    tokens = torch.randint(0, 17, (2, 8))
    linear = torch.nn.Linear(17, 6)
    with torch.no_grad():
        linear.weight.copy_(encoder.embedding.weight.T)
        linear.bias.copy_(encoder.embedding_bias)
    one_hot = torch.nn.functional.one_hot(tokens, 17).float()
    torch.testing.assert_close(encoder.embedding(tokens) + encoder.embedding_bias, linear(one_hot))
    bound = 1 / math.sqrt(17)  # nn.Linear's initialisation range
    assert encoder.embedding.weight.abs().max() <= bound


def _pixels(colours):
    data = np.zeros((1, 3072), dtype=np.uint8)
    for index, (red, green, blue) in enumerate(colours):
        data[0, index], data[0, 1024 + index], data[0, 2048 + index] = red, green, blue
    return data


def test_grayscale_tensorflow_known_values():
    colours = [(1, 2, 3), (4, 10, 1), (2, 0, 0), (255, 255, 255), (0, 255, 0), (255, 255, 0)]
    gray = grayscale_tokens(_pixels(colours), "tensorflow")[0, : len(colours)]
    # (1,2,3) -> 1 and (4,10,1) -> 7 are TensorFlow's own testBasicRGBToGrayscale values.
    # (2,0,0): 0.598 truncates to 0 where rounding gives 1. (255,255,0): 225.90 * (1 + 1/510)
    # = 226.35 -> 226, one above plain truncation: TF's cast back scales by 255.5, not 255.
    assert gray.tolist() == [1, 7, 0, 255, 149, 226]
    assert grayscale_tokens(_pixels(colours), "round")[0, : len(colours)].tolist() == [
        2, 7, 1, 255, 150, 226
    ]  # fmt: skip


def test_grayscale_tensorflow_differs_from_rounding_on_a_quarter_of_pixels():
    data = np.random.default_rng(0).integers(0, 256, (64, 3072), dtype=np.uint8)
    tf_gray = grayscale_tokens(data, "tensorflow").astype(int)
    rounded = grayscale_tokens(data, "round").astype(int)
    difference = rounded - tf_gray
    assert set(np.unique(difference)) <= {0, 1}
    assert 0.22 < (difference == 1).mean() < 0.28


def test_grayscale_pil_is_bit_exact_with_pil():
    data = np.random.default_rng(1).integers(0, 256, (3, 3072), dtype=np.uint8)
    for row, gray in zip(data, grayscale_tokens(data, "pil"), strict=True):
        rgb = row.reshape(3, 32, 32).transpose(1, 2, 0)
        expected = np.asarray(Image.fromarray(rgb, mode="RGB").convert("L")).reshape(-1)
        np.testing.assert_array_equal(gray, expected)


def test_text_validation_is_held_out_of_train(tmp_path):
    root = write_imdb(tmp_path, as_tar=False)
    data = load_text(root, max_len=16, val_fraction=0.5)
    train_items = {tuple(data.train[i][0].tolist()) for i in range(len(data.train))}
    val_items = {tuple(data.val[i][0].tolist()) for i in range(len(data.val))}
    assert len(data.train) == len(data.val) == 2 and not train_items & val_items
    assert len(data.test) == 2 and data.val is not data.test
    assert load_text(root, max_len=16, val_fraction=0.0).val is not None


def test_text_random_crop_takes_windows_of_long_reviews(tmp_path):
    root = write_imdb(tmp_path, as_tar=False)
    data = load_text(root, max_len=8, val_fraction=0.0, train_crop="random")
    review = b"Dull. " * 40
    ids = np.frombuffer(review, dtype=np.uint8).astype(np.int64) + 1
    index = next(i for i in range(len(data.train)) if len(data.train.sequences[i]) == len(ids))
    torch.manual_seed(0)
    windows = {tuple(data.train[index][0].tolist()) for _ in range(20)}
    assert len(windows) > 1
    text = "".join(map(chr, ids - 1))
    for window in windows:
        assert "".join(chr(i - 1) for i in window) in text
    # Evaluation keeps the head.
    assert data.test[0][0].shape == (8,)


def _evaluate_paper_listops(tokens: list[str]) -> int:
    """An independent stack evaluator of the paper's ListOps (upper median, FIRST, LAST)."""
    stack = []
    for token in tokens:
        if token == "]":
            values = []
            while not isinstance(stack[-1], str):
                values.append(stack.pop())
            operator, values = stack.pop(), values[::-1]
            stack.append({
                "[MIN": min, "[MAX": max, "[FIRST": lambda v: v[0], "[LAST": lambda v: v[-1],
                "[MED": lambda v: sorted(v)[len(v) // 2], "[SM": lambda v: sum(v) % 10,
            }[operator](values))  # fmt: skip
        else:
            stack.append(token if token.startswith("[") else int(token))
    (value,) = stack
    return value


def test_paper_listops_trees_have_the_exact_length_and_value():
    rng = random.Random(0)
    for length in (4, 5, 17, 60, 200):
        for _ in range(5):
            tree = generate_tree(rng, length)
            assert len(tree.tokens()) == length == len(tree)
            assert tree.value() == _evaluate_paper_listops(tree.tokens())
    operators = {generate_tree(rng, 40).tokens()[0] for _ in range(60)}
    assert {"[FIRST", "[LAST"} <= operators


def test_paper_listops_batches_share_one_length_and_are_seeded():
    batches = ListOpsBatches(3, 4, 10, 30, seed=5)
    tokens, labels = batches[1]
    assert tokens.shape[0] == 4 and 10 <= tokens.shape[1] <= 30 and labels.shape == (4,)
    assert (tokens != 0).all()  # one length per batch: no padding
    again, _ = ListOpsBatches(3, 4, 10, 30, seed=5)[1]
    assert torch.equal(tokens, again)
    batches.set_epoch(1)
    assert not torch.equal(batches[1][0][:, :10], tokens[:, :10])
    fixed = ListOpsBatches(3, 4, 10, 30, seed=5, fixed=True)
    first = fixed[0][0]
    fixed.set_epoch(3)
    assert torch.equal(fixed[0][0], first)


def test_summary_keeps_presets_apart():
    from experiments.lra.summary import attention_label

    assert attention_label({"attention": "softmax"}) == "softmax"
    assert attention_label({"attention": "softmax", "preset": "lra"}) == "softmax, lra preset"
    assert (
        attention_label({"attention": "taylorshift", "mode": "auto", "preset": "paper"})
        == "taylorshift (auto), paper preset"
    )
