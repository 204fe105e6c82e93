"""Pathfinder-32: the generator against its ground truth, the loader on both metadata forms."""

import itertools
import math

import numpy as np
import pytest
from PIL import Image

from experiments.lra.data import DataLayoutError, load_task
from experiments.lra.data.pathfinder import parse_metadata
from experiments.lra.generators.pathfinder import write_pathfinder
from experiments.lra.generators.pathfinder_geometry import Grid
from experiments.lra.generators.pathfinder_sampling import PathfinderSettings, sample_pathfinder


def test_markers_sit_on_snake_ends_and_match_the_label(pathfinder_samples):
    _, _, samples = pathfinder_samples
    settings = PathfinderSettings(contour_length=14)
    assert {sample.label for sample in samples} == {0, 1}
    for sample in samples:
        first, second = sample.snakes[:2]
        assert len(first) == len(second) == 14
        assert all(len(snake) == settings.distractor_length for snake in sample.snakes[2:])
        origin_snake, terminal_snake = sample.marker_snakes
        assert (origin_snake == terminal_snake) == (sample.label == 1)
        assert sample.markers[0] == sample.snakes[origin_snake][0].start
        assert sample.markers[1] == sample.snakes[terminal_snake][-1].end
        # Both target snakes start near the centre, seed_distance apart (up to pixel rounding).
        gap = math.dist(first[0].start, second[0].start)
        assert abs(gap - settings.seed_distance) <= math.sqrt(2) / 2 + 1e-9


def test_snakes_do_not_touch_each_other():
    settings = PathfinderSettings(contour_length=9)
    grid = Grid(settings.size, settings.padding, settings.paddle_margin, settings.paddle_thickness)
    rng = np.random.default_rng(11)
    for _ in range(4):
        sample = sample_pathfinder(settings, rng)
        strokes = [np.any([grid.stroke(p) for p in snake], axis=0) for snake in sample.snakes]
        for i in range(len(strokes)):
            for j in range(i + 1, len(strokes)):
                assert not (strokes[i] & strokes[j]).any(), f"snakes {i} and {j} overlap"
        # Consecutive dashes of a snake are separate: gaps of about 1-2 px (rounding varies them).
        for snake in sample.snakes:
            for before, after in itertools.pairwise(snake):
                assert 0.4 <= math.dist(before.end, after.start) <= 3.5


def test_pngs_and_metadata_agree_with_ground_truth(pathfinder_samples):
    _, directory, samples = pathfinder_samples
    rows = parse_metadata(directory / "metadata" / "0.npy") + parse_metadata(
        directory / "metadata" / "1.npy"
    )
    rows += parse_metadata(directory / "metadata" / "2.npy")
    assert len(rows) == len(samples) == 12
    for row, sample in zip(rows, samples, strict=True):
        assert len(row) == 11 and row[5] == "14" and int(row[3]) == sample.label
        with Image.open(directory / row[0] / row[1]) as image:
            assert image.mode == "L" and image.size == (32, 32)
            pixels = np.asarray(image)
        assert pixels.max() == 255
        for y, x in sample.markers:
            y, x = round(y), round(x)
            assert pixels[y - 1 : y + 2, x - 1 : x + 2].max() >= 200, "marker not drawn"


def test_generator_is_deterministic(tmp_path, pathfinder_samples):
    _, directory, _ = pathfinder_samples
    again, _ = write_pathfinder(tmp_path, 12, contour_length=14, images_per_batch=5, seed=3)
    for path in directory.rglob("*.*"):
        assert path.read_bytes() == (again / path.relative_to(directory)).read_bytes()
    other, _ = write_pathfinder(
        tmp_path / "other", 5, contour_length=14, images_per_batch=5, seed=4
    )
    assert (other / "imgs/0/sample_0.png").read_bytes() != (
        directory / "imgs/0/sample_0.png"
    ).read_bytes()


@pytest.mark.parametrize("metadata_format", ["text", "npy"])
def test_loader_round_trips_both_metadata_forms(tmp_path, metadata_format):
    directory, samples = write_pathfinder(
        tmp_path, 10, contour_length=6, images_per_batch=4, seed=1, metadata_format=metadata_format
    )
    first_file = (directory / "metadata" / "0.npy").read_bytes()
    assert first_file.startswith(b"\x93NUMPY") == (metadata_format == "npy")
    data = load_task("pathfinder", tmp_path, difficulty="curv_baseline")
    assert (len(data.train), len(data.val), len(data.test)) == (8, 1, 1)
    assert not data.pads and data.vocab_size == 256
    loaded = {}
    for dataset in (data.train, data.val, data.test):
        for path, (tokens, label) in zip(dataset.paths, dataset, strict=True):
            loaded[path.relative_to(directory).as_posix()] = (tokens, int(label))
    assert len(loaded) == 10
    for index, sample in enumerate(samples):
        tokens, label = loaded[f"imgs/{index // 4}/sample_{index % 4}.png"]
        assert label == sample.label
        with Image.open(directory / f"imgs/{index // 4}/sample_{index % 4}.png") as image:
            assert tokens.tolist() == np.asarray(image).reshape(-1).tolist()


def test_loader_skips_empty_pngs_and_names_missing_files(tmp_path):
    directory, _ = write_pathfinder(tmp_path, 4, contour_length=14, images_per_batch=4, seed=2)
    (directory / "imgs/0/sample_1.png").write_bytes(b"")
    assert sum(len(split) for split in _splits(load_task("pathfinder", tmp_path))) == 3
    (directory / "imgs/0/sample_2.png").unlink()
    with pytest.raises(DataLayoutError, match="sample_2.png"):
        load_task("pathfinder", tmp_path)
    with pytest.raises(DataLayoutError, match="curv_contour_length_9/metadata"):
        load_task("pathfinder", tmp_path, difficulty="curv_contour_length_9")


def _splits(data):
    return data.train, data.val, data.test
