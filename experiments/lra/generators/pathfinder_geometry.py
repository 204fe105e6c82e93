"""Paddles, snakes and occupancy for the Pathfinder generator (lra.md section 3.2), at 1x.

Points are (y, x) floats; pixel (i, j) has its centre at (i, j). A paddle is a 2-px dash; its
footprint (the dash dilated by the margin) is what other paddles may not overlap.
"""

import math
from dataclasses import dataclass

import numpy as np


def unit(angle: float) -> np.ndarray:
    """Direction of an angle in (y, x) coordinates, as upstream: (sin, cos)."""
    return np.array([math.sin(angle), math.cos(angle)])


@dataclass(frozen=True)
class Paddle:
    start: tuple[float, float]
    end: tuple[float, float]


class Grid:
    """Distance fields and occupancy on the image; a border of `padding` pixels is blocked."""

    def __init__(self, size: int, padding: int, margin: int, thickness: float):
        self.size, self.padding = size, padding
        self.rows, self.cols = np.mgrid[0:size, 0:size].astype(np.float64)
        # Pixel centres within margin + 1/2 of the dash: for margin 1 a 3x3 disk around each point.
        self.footprint_radius = margin + 0.5
        self.stroke_radius = 0.5 + thickness / 2
        self.border = np.ones((size, size), dtype=bool)
        self.border[padding : size - padding, padding : size - padding] = False

    def distance_to(self, paddle: Paddle) -> np.ndarray:
        start, end = np.asarray(paddle.start), np.asarray(paddle.end)
        direction = end - start
        length_sq = float(direction @ direction) or 1.0
        t = (
            (self.rows - start[0]) * direction[0] + (self.cols - start[1]) * direction[1]
        ) / length_sq
        t = np.clip(t, 0.0, 1.0)
        return np.hypot(
            self.rows - (start[0] + t * direction[0]), self.cols - (start[1] + t * direction[1])
        )

    def stroke(self, paddle: Paddle) -> np.ndarray:
        return self.distance_to(paddle) <= self.stroke_radius

    def footprint(self, paddle: Paddle) -> np.ndarray:
        return self.distance_to(paddle) <= self.footprint_radius

    def inside(self, point) -> bool:
        low, high = self.padding, self.size - 1 - self.padding
        return low <= round(point[0]) <= high and low <= round(point[1]) <= high


def dilate(mask: np.ndarray) -> np.ndarray:
    """3x3 dilation (the margin-1 disk on the pixel grid)."""
    padded = np.pad(mask, 1)
    out = np.zeros_like(mask)
    for dy in range(3):
        for dx in range(3):
            out |= padded[dy : dy + mask.shape[0], dx : dx + mask.shape[1]]
    return out


@dataclass
class Snake:
    """A contour under construction: its paddles, and the pivot and heading the next one grows from.

    Paddles run along the snake (start towards end). `pending` is the footprint of the newest
    paddle: it joins the shared occupancy only when the next paddle is placed, so consecutive
    dashes of one snake do not block each other.
    """

    paddles: list[Paddle]
    pivot: np.ndarray
    angle: float
    pending: np.ndarray

    @property
    def origin_tip(self) -> tuple[float, float]:
        return self.paddles[0].start

    @property
    def terminal_tip(self) -> tuple[float, float]:
        return self.paddles[-1].end
