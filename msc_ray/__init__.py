"""msc-ray: confluence classification, abnormal-cell detection and archive scoring for MSC cultures on Ray."""

__version__ = "0.1.0"

#: Confluence bands (fraction of the image covered by cells), class 1..4.
BAND_EDGES = (0.0, 0.4, 0.6, 0.8, 1.0)
BAND_NAMES = ("1", "2", "3", "4")
STACKS = ("sstack", "mstack")
ABNORMAL_LABEL = "Flatten"
#: Test-time views a classifier's outputs (:func:`msc_ray.engine.view_mean`) and a U-Net's maps
#: (:meth:`msc_ray.models.UNetWatershed.maps`) can be averaged over.
VIEWS = (1, 4, 8)


def check_views(views: int, label: str) -> None:
    """A one-line ``ValueError`` that starts with ``label`` unless ``views`` is one of :data:`VIEWS`."""
    if views not in VIEWS:
        raise ValueError(f"{label}: choose one of {', '.join(map(str, VIEWS))}")
