"""Rendering a Pathfinder sample to an 8-bit grayscale image (lra.md section 3.2, 3.3 and 3.5).

Dashes and markers are drawn at antialias_scale x with PIL and Lanczos-downsampled, as upstream;
the result is rescaled min..max to 0..255 as scipy.misc.imsave did.
"""

import numpy as np
from PIL import Image, ImageDraw

from .pathfinder_sampling import PathfinderSample, PathfinderSettings


def _to_canvas(point, scale: int) -> tuple[float, float]:
    """(y, x) pixel centre at 1x -> (x, y) PIL coordinate of the same spot at scale x."""
    return point[1] * scale + (scale - 1) / 2, point[0] * scale + (scale - 1) / 2


def _downsample(canvas: Image.Image, size: int) -> np.ndarray:
    small = canvas.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(small, dtype=np.float64) / 255.0


def render(sample: PathfinderSample, settings: PathfinderSettings) -> np.ndarray:
    scale, size = settings.antialias_scale, settings.size
    paths = Image.new("L", (size * scale, size * scale), 0)
    draw = ImageDraw.Draw(paths)
    width = max(1, round(settings.paddle_thickness * scale))
    for snake in sample.snakes:
        for paddle in snake:
            draw.line(
                [_to_canvas(paddle.start, scale), _to_canvas(paddle.end, scale)],
                fill=255,
                width=width,
            )
    markers = Image.new("L", (size * scale, size * scale), 0)
    draw = ImageDraw.Draw(markers)
    radius = settings.marker_radius * scale
    for marker in sample.markers:
        x, y = _to_canvas(marker, scale)
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=255)
    intensity = settings.snake_contrast * settings.paddle_contrast
    image = np.maximum(_downsample(paths, size), _downsample(markers, size)) * intensity
    image = np.clip(image, 0.0, None)
    low, high = image.min(), image.max()
    return np.rint((image - low) / max(high - low, 1e-12) * 255).astype(np.uint8)
