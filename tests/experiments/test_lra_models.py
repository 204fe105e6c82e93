"""The encoder classifiers: padding is invisible, both attention kinds share one structure."""

import pytest
import torch

from experiments.lra.models import build_model
from experiments.lra.training.config import load_config
from experiments.lra.training.precision import Precision

SMALL = {"dim": 16, "depth": 2, "heads": 2, "mlp_ratio": 2, "dropout": 0.0}


@pytest.mark.parametrize(
    ("attention", "mode"),
    [
        ("taylorshift", "direct"),
        ("taylorshift", "efficient"),
        ("taylorshift", "auto"),
        ("softmax", "auto"),
    ],
)
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_padding_does_not_change_logits(attention, mode, pooling):
    torch.manual_seed(0)
    model = build_model(
        {**SMALL, "attention": attention, "mode": mode, "pooling": pooling}, 20, 32, 5, True, False
    )
    model.eval()
    tokens = torch.randint(1, 20, (3, 10))
    padded = torch.cat([tokens, torch.zeros(3, 6, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model(padded), model(tokens), rtol=1e-5, atol=1e-5)
    # Without masking, the extra tokens would matter: the check above can fail.
    model.encoder.pads = False
    assert not torch.allclose(model(padded), model(tokens), atol=1e-4)


def test_taylorshift_modes_agree_and_softmax_differs():
    outputs = {}
    for attention, mode in [
        ("taylorshift", "direct"),
        ("taylorshift", "efficient"),
        ("softmax", "auto"),
    ]:
        torch.manual_seed(0)
        model = build_model(
            {**SMALL, "attention": attention, "mode": mode}, 20, 32, 5, True, False
        ).eval()
        outputs[attention, mode] = model(torch.randint(1, 20, (2, 12)))
    torch.testing.assert_close(
        outputs["taylorshift", "direct"], outputs["taylorshift", "efficient"]
    )
    assert not torch.allclose(outputs["taylorshift", "direct"], outputs["softmax", "auto"])


def test_pair_classifier_encodes_each_document_alone():
    model = build_model({**SMALL, "mlp_dim": 8, "interaction": "nli"}, 20, 32, 2, True, True).eval()
    first, second = torch.randint(1, 20, (4, 9)), torch.randint(1, 20, (4, 5))
    assert model(first, second).shape == (4, 2)
    # Each document is encoded alone: padding the shorter one to the longer changes nothing.
    with torch.no_grad():
        u = model.encoder(second)
        v = model.encoder(torch.nn.functional.pad(second, (0, 4)))
    torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)


def test_shipped_configs_hold_the_paper_and_lra_sizes():
    sizes = {
        task: load_config(task)["model"]
        for task in ("listops", "text", "image", "retrieval", "pathfinder")
    }
    shape = {task: (m["dim"], m["depth"], m["heads"], m["mlp_ratio"]) for task, m in sizes.items()}
    assert shape["listops"] == (512, 4, 8, 2)
    assert shape["text"] == (256, 4, 4, 4)
    assert shape["image"] == (256, 1, 4, 1)
    assert shape["retrieval"] == (128, 4, 4, 4) and sizes["retrieval"]["mlp_dim"] == 512
    assert shape["pathfinder"] == (32, 4, 4, 1) and sizes["pathfinder"]["pooling"] == "mean"
    pathfinder = build_model(sizes["pathfinder"], 256, 1024, 2, False, False)
    attention = pathfinder.encoder.blocks[0].attention.attention
    assert (attention.embed_dim, attention.kdim) == (16, 32)
    model = build_model(sizes["listops"], 19, 2000, 10, True, False)
    assert model.encoder.blocks[0].attention.attention.temperature.shape == (8,)


def test_cpu_precision_is_fp32_and_gpu_only_modes_are_refused():
    assert Precision("auto", torch.device("cpu")).name == "fp32"
    assert Precision("auto", torch.device("cpu")).scaler is None
    for name in ("bf16", "fp16"):
        with pytest.raises(ValueError, match="needs a GPU"):
            Precision(name, torch.device("cpu"))
