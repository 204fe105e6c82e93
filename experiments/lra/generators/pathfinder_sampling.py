"""One Pathfinder sample: two target snakes, distractors, markers (lra.md sections 3.1-3.3).

A re-implementation of drewlinsley's snakes2 `from_wrapper` with numpy only; rendering is in
pathfinder_render.py. Every function draws from the numpy Generator it is given, so a seed fixes
the whole sample.
"""

import math
from dataclasses import dataclass

import numpy as np

from .pathfinder_geometry import Grid, Paddle, Snake, dilate, unit


@dataclass(frozen=True)
class PathfinderSettings:
    """LRA's pathfinder32 parameters; contour_length 6, 9 or 14 selects the difficulty."""

    contour_length: int = 14
    size: int = 32
    padding: int = 1
    antialias_scale: int = 2
    paddle_length: float = 2.0
    paddle_thickness: float = 0.5
    paddle_margin: int = 1
    marker_radius: float = 1.5
    seed_distance: int = 7
    continuity: float = 1.0
    snake_contrast: float = 2.0
    paddle_contrast: float = 0.75
    max_paddle_retrial: int = 2
    max_distractor_contour_retrial: int = 4
    # Restarts of the target pair before giving up; the parameters succeed within a few.
    max_pair_attempts: int = 1000

    @property
    def distractor_length(self) -> int:
        return self.contour_length // 3

    @property
    def num_distractor_snakes(self) -> int:
        return 20 // self.distractor_length


@dataclass
class PathfinderSample:
    """A sample and the ground truth the tests check it against."""

    label: int
    snakes: list[list[Paddle]]  # the two target snakes first, then the distractors
    markers: tuple[tuple[float, float], tuple[float, float]]  # (origin marker, terminal marker)
    marker_snakes: tuple[int, int]  # index in `snakes` of the snake each marker sits on


def _random_angle(rng: np.random.Generator) -> float:
    # Upstream draws a whole number of degrees in [-180, 180).
    return math.radians(int(rng.integers(-180, 180)))


def _seed(settings: PathfinderSettings, grid: Grid, tail, angle: float, blocked: np.ndarray | None):
    """A first paddle from `tail` along `angle`; None if it leaves the image or is blocked."""
    length, margin = settings.paddle_length, settings.paddle_margin
    tail = np.asarray(tail, dtype=np.float64)
    head = tail + length * unit(angle)
    pivot = head - (length + margin) * unit(angle)
    if not (grid.inside(tail) and grid.inside(head) and grid.inside(pivot)):
        return None
    paddle = Paddle(tuple(tail), tuple(head))
    if blocked is not None and (grid.stroke(paddle) & blocked).any():
        return None
    return Snake([paddle], pivot, angle, grid.footprint(paddle))


def _seed_anywhere(settings, grid, rng, occupied: np.ndarray):
    free = np.argwhere(~dilate(occupied))
    if len(free) == 0:
        return None
    tail = free[rng.integers(len(free))]
    return _seed(settings, grid, tail, _random_angle(rng), occupied)


def _extend(
    settings: PathfinderSettings, grid: Grid, rng, snake: Snake, blocked: np.ndarray
) -> bool:
    """Adds one paddle to `snake` (extend_snake); False if no candidate fits."""
    length, margin = settings.paddle_length, settings.paddle_margin
    pivot = np.ceil(snake.pivot + (length + 2 * margin) * unit(snake.angle))
    radius = length + margin
    # Candidate heads: integer points on a circle around the pivot, about one pixel of arc apart.
    count = math.ceil(2 * math.pi * radius)
    angles = 2 * math.pi * np.arange(count) / count
    points = np.unique(
        np.rint(pivot + radius * np.stack([np.sin(angles), np.cos(angles)], 1)), axis=0
    )
    points = np.array([point for point in points if grid.inside(point)])
    if len(points) == 0:
        return False
    offsets = points - pivot
    headings = np.arctan2(offsets[:, 0], offsets[:, 1])
    turn = np.abs((headings - snake.angle + math.pi) % (2 * math.pi) - math.pi)
    free = ~dilate(blocked)[points[:, 0].astype(int), points[:, 1].astype(int)]
    weights = np.cos(np.minimum(turn * settings.continuity, math.pi / 2)) ** 2 * free
    for _ in range(settings.max_paddle_retrial + 1):
        if weights.sum() <= 1e-12:
            return False
        choice = rng.choice(len(points), p=weights / weights.sum())
        head = points[choice]
        # The paddle is drawn from the head back towards the pivot (orientation heading + pi).
        paddle = Paddle(tuple(head - length * unit(headings[choice])), tuple(head))
        if not (grid.stroke(paddle) & blocked).any():
            snake.paddles.append(paddle)
            snake.pivot, snake.angle = pivot, float(headings[choice])
            return True
        weights[choice] = 0.0
    return False


def _commit_pending(occupied: np.ndarray, snake: Snake, grid: Grid) -> None:
    """After a successful extension the previous paddle's footprint becomes occupied."""
    occupied |= snake.pending
    snake.pending = grid.footprint(snake.paddles[-1])


def _target_pair(settings, grid, rng):
    """Two snakes of contour_length paddles whose starts lie seed_distance apart (two_snakes)."""
    size, distance = settings.size, settings.seed_distance
    central = np.arange(2 * distance, size - 2 * distance)
    for _ in range(settings.max_pair_attempts):
        occupied = grid.border.copy()
        first = _seed(settings, grid, rng.choice(central, 2), _random_angle(rng), occupied)
        if first is None:
            continue
        direction = rng.uniform(0, 2 * math.pi)
        second_tail = np.rint(np.asarray(first.origin_tip) + distance * unit(direction))
        # The second seed is only bounds-checked, as upstream.
        second = _seed(settings, grid, second_tail, _random_angle(rng), None)
        if second is None:
            continue
        snakes, ok = (first, second), True
        for _ in range(settings.contour_length - 1):
            for this, other in ((first, second), (second, first)):
                ok = _extend(settings, grid, rng, this, occupied | other.pending)
                if not ok:
                    break
                _commit_pending(occupied, this, grid)
            if not ok:
                break
        if ok:
            for snake in snakes:
                occupied |= snake.pending
            return snakes, occupied
    raise RuntimeError(f"no target pair fitted in {settings.max_pair_attempts} attempts")


def _distractors(settings, grid, rng, occupied: np.ndarray) -> list[Snake]:
    """make_many_snakes: up to num_distractor_snakes short snakes, each with a few retries."""
    snakes = []
    for _ in range(settings.num_distractor_snakes):
        if (~occupied).mean() < 0.01:
            break
        for _ in range(settings.max_distractor_contour_retrial):
            trial = occupied.copy()
            snake = _seed_anywhere(settings, grid, rng, trial)
            ok = snake is not None
            for _ in range(settings.distractor_length - 1 if ok else 0):
                ok = _extend(settings, grid, rng, snake, trial)
                if not ok:
                    break
                _commit_pending(trial, snake, grid)
            if ok:
                occupied[:] = trial | snake.pending
                snakes.append(snake)
                break
    return snakes


def sample_pathfinder(settings: PathfinderSettings, rng: np.random.Generator) -> PathfinderSample:
    """from_wrapper: label, two target snakes, distractors, then the two markers."""
    grid = Grid(settings.size, settings.padding, settings.paddle_margin, settings.paddle_thickness)
    label = int(rng.integers(0, 2))
    targets, occupied = _target_pair(settings, grid, rng)
    distractors = _distractors(settings, grid, rng, occupied)
    origin = int(rng.integers(0, 2))
    # Connected (label 1): the terminal marker ends the snake the origin marker starts. Otherwise it
    # ends the other target snake, whose start lies seed_distance away.
    terminal = origin if label == 1 else 1 - origin
    markers = (targets[origin].origin_tip, targets[terminal].terminal_tip)
    return PathfinderSample(
        label=label,
        snakes=[snake.paddles for snake in (*targets, *distractors)],
        markers=markers,
        marker_snakes=(origin, terminal),
    )
