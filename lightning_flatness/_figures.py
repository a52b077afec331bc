"""One place for the figure rules shared by the landscape views and the study's report.

matplotlib's object-oriented API with the Agg canvas: no pyplot, no global backend state, so
drawing from a callback never touches a user's interactive figures.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

# A y-axis goes to log scale when its positive values span more than this ratio.
LOG_SCALE_RATIO = 30.0


def figure(width: float = 6.4, height: float = 4.2, layout: str | None = None) -> Any:  # noqa: ANN401
    """A matplotlib ``Figure`` on an Agg canvas (``layout="constrained"`` costs ~0.5 s a figure)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise SystemExit("plots need matplotlib: pip install matplotlib (the report takes --no-plots)") from err
    fig = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(fig)
    return fig


def when(epochs_completed: int) -> str:
    """``"at initialization"``, ``"after 1 epoch"``, ``"after 3 epochs"``: figure titles and labels
    (epochs completed, unambiguous beside Lightning's 0-based epoch index)."""
    if epochs_completed == 0:
        return "at initialization"
    return f"after {epochs_completed} epoch{'s' if epochs_completed != 1 else ''}"


def colors(n: int) -> list:
    """``n`` colors along viridis, one per run, in run order."""
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(0.9 * i / max(n - 1, 1)) for i in range(n)]


def wants_log_scale(values: Sequence[float]) -> bool:
    """True when the finite values are all positive and span more than :data:`LOG_SCALE_RATIO`."""
    vals = [v for v in values if math.isfinite(v)]
    return bool(vals) and min(vals) > 0 and max(vals) / min(vals) > LOG_SCALE_RATIO


def render(fig: Any) -> Any:  # noqa: ANN401
    """The figure as an ``(H, W, 3)`` uint8 array."""
    import numpy as np

    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
