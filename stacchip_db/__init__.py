"""stacchip-db: training chips from satellite and aerial imagery, indexed in PostGIS + pgstac."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("stacchip-db")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"


def __getattr__(name: str):
    # Heavy imports (rasterio, pyarrow) only when the API is used, so the CLI starts fast.
    if name == "index_item":
        from stacchip_db.index import index_item

        return index_item
    if name in ("index_items", "IndexSummary"):
        from stacchip_db import indexing

        return getattr(indexing, name)
    if name == "ChipDataset":
        from stacchip_db.dataset import ChipDataset

        return ChipDataset
    if name == "ChipSampler":
        from stacchip_db.sampler import ChipSampler

        return ChipSampler
    raise AttributeError(f"module 'stacchip_db' has no attribute {name!r}")


__all__ = [
    "ChipDataset",
    "ChipSampler",
    "IndexSummary",
    "__version__",
    "index_item",
    "index_items",
]
