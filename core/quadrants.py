"""Image quadrants: their names and the quadrant a point lies in."""

QUADRANTS = ("top_left", "top_right", "bottom_left", "bottom_right")


def quadrant_of(point: tuple[float, float], size: tuple[int, int]) -> str:
    """The quadrant of an (x, y) point in an image of `size` = (width, height), as PIL gives it.

    Pixel centres sit at integer coordinates, so the image's middle is at
    ((width - 1) / 2, (height - 1) / 2); a point exactly there counts as bottom right.
    """
    x, y = point
    width, height = size
    vertical = "top" if y < (height - 1) / 2 else "bottom"
    horizontal = "left" if x < (width - 1) / 2 else "right"
    return f"{vertical}_{horizontal}"
