"""Works inside: eval-mode forward time of third-party models before and after replace_attention.

Each model is timed as its library builds it (random init, float32, batch 1, no_grad, eval), at
its natural input size and at a long one, with PyTorch's softmax attention (SDPA and the fused
fast paths where the model takes them) and after `taylorshift.replace_attention(model)` with the
default mode="auto". Times are the fastest of --repeats runs (see best_seconds), with all of
torch's threads. Prints a markdown table.

    PYTHONPATH=. python benchmarks/bench_clients.py [--only NAME ...] [--repeats R] [--sizes natural|long|both]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

import taylorshift


def vit_b_16(image_size):
    import torchvision

    model = torchvision.models.vit_b_16(weights=None, image_size=image_size)
    images = torch.randn(1, 3, image_size, image_size)
    return model, lambda m: m(images), f"{(image_size // 16) ** 2 + 1} tokens"


def open_clip_image(image_size):
    import open_clip

    cfg = open_clip.get_model_config("ViT-B-32")
    cfg["vision_cfg"]["image_size"] = image_size
    model = open_clip.CLIP(**cfg)
    images = torch.randn(1, 3, image_size, image_size)
    return model, lambda m: m.encode_image(images), f"{(image_size // 32) ** 2 + 1} tokens"


def open_clip_text(_):
    import open_clip

    model = open_clip.CLIP(**open_clip.get_model_config("ViT-B-32"))
    text = torch.randint(1, 49408, (1, 77))
    return model, lambda m: m.encode_text(text), "77 tokens, causal"


def transformer_encoder(tokens):
    # Padding mask on 1/8 of the tokens: the softmax encoder's nested-tensor fast path applies.
    layer = nn.TransformerEncoderLayer(256, 8, 1024, batch_first=True)
    model = nn.TransformerEncoder(layer, 4)
    x = torch.randn(1, tokens, 256)
    padding = torch.zeros(1, tokens, dtype=torch.bool)
    padding[:, -tokens // 8 :] = True
    return model, lambda m: m(x, src_key_padding_mask=padding), f"{tokens} tokens, padded"


def transformer_causal(tokens):
    model = nn.Transformer(256, 8, 2, 2, 1024, batch_first=True)
    src, tgt = torch.randn(1, tokens, 256), torch.randn(1, tokens, 256)
    causal = nn.Transformer.generate_square_subsequent_mask(tokens)
    return (
        model,
        lambda m: m(src, tgt, tgt_mask=causal, tgt_is_causal=True),
        f"{tokens} + {tokens} tokens, causal",
    )


def gps_conv(nodes):
    from torch_geometric.nn import GINConv, GPSConv

    mlp = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    model = GPSConv(64, GINConv(mlp), heads=4)
    x = torch.randn(sum(nodes), 64)
    batch = torch.repeat_interleave(torch.arange(len(nodes)), torch.tensor(nodes))
    edge_index = torch.randint(0, sum(nodes), (2, 4 * sum(nodes)))  # edges only feed the GIN
    return (
        model,
        lambda m: m(x, edge_index, batch),
        f"graphs of {' + '.join(map(str, nodes))} nodes",
    )


# (name, builder, natural size, long size)
MODELS = [
    ("torchvision ViT-B/16", vit_b_16, 224, 1120),
    ("open_clip ViT-B-32 image", open_clip_image, 224, 2240),
    ("open_clip ViT-B-32 text", open_clip_text, None, None),
    ("nn.TransformerEncoder", transformer_encoder, 512, 8192),
    ("nn.Transformer", transformer_causal, 256, 2048),
    ("PyG GPSConv", gps_conv, (60, 40), (4000, 2500)),
]


def best_seconds(run, models, repeats) -> list[float]:
    """Fastest of `repeats` timed forwards of each model, interleaved (one of each per round),
    after a warm-up: on a shared machine the minimum is the least disturbed measurement, and
    interleaving exposes both models to the same load."""
    best = [float("inf")] * len(models)
    with torch.no_grad():
        for model in models:
            run(model)
        for _ in range(repeats):
            for i, model in enumerate(models):
                start = time.perf_counter()
                run(model)
                best[i] = min(best[i], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", help="substrings of the model names to run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", choices=["natural", "long", "both"], default="both")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, batch 1, eval")
    print()
    print("| model | input | softmax ms | TaylorShift ms | speed-up |")
    print("|---|---|---|---|---|")
    for name, build, natural, long in MODELS:
        if args.only and not any(s in name for s in args.only):
            continue
        sizes = {"natural": [natural], "long": [long], "both": [natural, long]}[args.sizes]
        for size in dict.fromkeys(sizes):
            original, run, label = build(size)
            original.eval()
            replaced = taylorshift.replace_attention(copy.deepcopy(original)).eval()
            before, after = best_seconds(run, [original, replaced], args.repeats)
            print(
                f"| {name} | {label} | {before * 1e3:.1f} | {after * 1e3:.1f} "
                f"| {before / after:.2f}x |",
                flush=True,
            )
            del original, replaced


if __name__ == "__main__":
    main()
