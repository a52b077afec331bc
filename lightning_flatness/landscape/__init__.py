"""Loss-landscape views: filter-normalized 1-D/2-D slices and the slice along the top Hessian
eigenvector (:mod:`.views`), their figures (:mod:`.plots`), and the callback's recorder
(:mod:`.recorder`)."""

from .recorder import LandscapeOptions, LandscapeRecorder
from .views import LandscapeViews, compute_views, read_final, views_from_json, views_to_json, write_json

__all__ = [
    "LandscapeOptions",
    "LandscapeRecorder",
    "LandscapeViews",
    "compute_views",
    "read_final",
    "views_from_json",
    "views_to_json",
    "write_json",
]
