"""Pathfinder-32 generator writing LRA's layout (lra.md section 3).

    python -m experiments.lra.generators.pathfinder --data-root data --contour-length 14

writes <data-root>/pathfinder32/<difficulty>/imgs/<batch>/sample_<n>.png (32x32, mode L) and
metadata/<batch>.npy with one row per image:
imgs/<batch> sample_<n>.png <n> <label> <continuity> <contour_length> <distractor_length>
<paddle_length> <paddle_thickness> <margin> <num_paddle_contrasts>
as plain text (the LRA release's form, default) or as a real .npy string array
(--metadata-format npy).
Batch b draws from numpy's default_rng([seed, b]), so batches can be made in parallel and any one
regenerated alone.
"""

import argparse
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.pathfinder import DIFFICULTIES
from .pathfinder_render import render
from .pathfinder_sampling import PathfinderSample, PathfinderSettings, sample_pathfinder


def metadata_row(batch: int, index: int, label: int, settings: PathfinderSettings) -> list[str]:
    return [
        f"imgs/{batch}",
        f"sample_{index}.png",
        str(index),
        str(label),
        str(settings.continuity),
        str(settings.contour_length),
        str(settings.distractor_length),
        f"{settings.paddle_length:g}",
        str(settings.paddle_thickness),
        str(settings.paddle_margin),
        "1",  # one paddle contrast
    ]


def write_metadata(path: Path, rows: list[list[str]], metadata_format: str) -> None:
    if metadata_format == "npy":
        with path.open("wb") as handle:
            np.save(handle, np.array(rows, dtype=str))
    else:
        path.write_text("".join(" ".join(row) + "\n" for row in rows))


def generate_batch(
    directory: Path,
    batch: int,
    count: int,
    settings: PathfinderSettings,
    seed: int,
    metadata_format: str,
) -> list[PathfinderSample]:
    """Writes one batch of PNGs and its metadata; returns the samples with their ground truth."""
    rng = np.random.default_rng([seed, batch])
    image_dir = directory / "imgs" / str(batch)
    image_dir.mkdir(parents=True, exist_ok=True)
    samples, rows = [], []
    for index in range(count):
        sample = sample_pathfinder(settings, rng)
        Image.fromarray(render(sample, settings), mode="L").save(image_dir / f"sample_{index}.png")
        samples.append(sample)
        rows.append(metadata_row(batch, index, sample.label, settings))
    (directory / "metadata").mkdir(parents=True, exist_ok=True)
    write_metadata(directory / "metadata" / f"{batch}.npy", rows, metadata_format)
    return samples


def write_pathfinder(
    data_root,
    num_images: int,
    contour_length: int = 14,
    images_per_batch: int = 1000,
    seed: int = 0,
    metadata_format: str = "text",
    workers: int = 1,
) -> tuple[Path, list[PathfinderSample]]:
    if contour_length not in DIFFICULTIES:
        raise ValueError(f"contour_length must be one of {sorted(DIFFICULTIES)}")
    settings = PathfinderSettings(contour_length=contour_length)
    directory = Path(data_root) / "pathfinder32" / DIFFICULTIES[contour_length]
    counts = [
        min(images_per_batch, num_images - start)
        for start in range(0, num_images, images_per_batch)
    ]
    jobs = [
        (directory, batch, count, settings, seed, metadata_format)
        for batch, count in enumerate(counts)
    ]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            batches = list(pool.map(generate_batch, *zip(*jobs, strict=True)))
    else:
        batches = [generate_batch(*job) for job in jobs]
    return directory, [sample for batch in batches for sample in batch]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--contour-length", type=int, default=14, choices=sorted(DIFFICULTIES))
    parser.add_argument("--num-images", type=int, default=200000)
    parser.add_argument("--images-per-batch", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--metadata-format", choices=("text", "npy"), default="text")
    parser.add_argument(
        "--workers", type=int, default=1, help="processes, one batch each at a time"
    )
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    directory, samples = write_pathfinder(
        args.data_root,
        args.num_images,
        args.contour_length,
        args.images_per_batch,
        args.seed,
        args.metadata_format,
        args.workers,
    )
    positives = sum(sample.label for sample in samples)
    print(f"wrote {len(samples)} images ({positives} connected) to {directory}")


if __name__ == "__main__":
    main()
