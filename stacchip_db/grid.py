"""The chip grid of a STAC item: which chips exist, where they are, which pixels they cover.

Same semantics as the original stacchip (`stacchip/indexer.py`, 0.1.38), so that an index built
here agrees chip for chip with one built there:

- the grid is the item's finest pixel grid: `proj:shape`/`proj:transform` on the item, else
  those of the asset with the smallest pixel (largest shape); an explicit shape may be passed;
- `x_size = floor(width / chip_size)`, `y_size = floor(height / chip_size)`; chip `(x, y)` covers
  pixels `[y*cs, (y+1)*cs) x [x*cs, (x+1)*cs)`; pixels past the last whole chip are not chipped;
- a chip's footprint is its four pixel-grid corners in the native CRS, reprojected to EPSG:4326
  (corners only, no densification, as the original).

Two deliberate differences, both fixes:

- the original took `proj:transform` from the asset whose *first* transform element is largest,
  i.e. the coarsest asset (60 m on Sentinel-2) while taking the shape from the finest (10 m), so
  its Sentinel-2 footprints are six times too large; here shape and transform come from the same,
  finest asset. Chip indices and quality fractions are unaffected.
- the original passed the top edge as `miny` to `shapely.box`, giving clockwise rings starting at
  the top-right corner; here exterior rings are counter-clockwise (OGC / RFC 7946), in the order
  `shapely.box(left, bottom, right, top)` gives. The geometries are equal (`ST_Equals`).

Footprints are computed for the whole grid at once: the `(y_size + 1) x (x_size + 1)` lattice of
chip corners goes through one pyproj call (one cached transformer per CRS), and the WKB polygons
are written by numpy as fixed 93-byte records, so a 43 x 43 Sentinel-2 grid costs milliseconds,
not one transform per chip.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any

import numpy as np
import pyproj
from affine import Affine
from rasterio.windows import Window

from stacchip_db.errors import StacchipError

CHIP_SIZE = 256
"""Default chip size in pixels of the item's finest grid (the Clay model's input size)."""

MAX_CHIPS = 1_000_000
"""Default bound on the chips of one item, checked before any per-chip array is allocated
(a Sentinel-2 scene has 1,764 chips of 256 px; one million is a 256 x 256 km scene at 1 m
in 256 px chips). A bad `proj:shape` or a tiny chip size then fails fast instead of taking
gigabytes: 10^7 x 10^7 px in 256 px chips would be 1.5 billion chips."""

CRS_KEYS = ("proj:code", "proj:epsg", "proj:wkt2", "proj:projjson")
"""Projection-extension fields a CRS is read from, in order of preference."""

_WGS84 = pyproj.CRS.from_epsg(4326)
# A 4-corner polygon as little-endian WKB: byte order, type 3 (Polygon), one ring of 5 points.
_POLYGON_WKB = np.dtype(
    [("byte_order", "u1"), ("type", "<u4"), ("rings", "<u4"), ("points", "<u4"), ("xy", "<f8", 10)]
)
_METRE_UNITS = frozenset({"metre", "meter", "m"})
# Pixel-coordinate tolerance for "is an integer": generous for float noise in STAC transforms
# (values like 0.6 or 4749053.4), far below any real misalignment.
_PIXEL_TOL = 1e-6


class GridError(StacchipError):
    """The item's georeferencing does not define a usable chip grid."""


class ItemFormatError(GridError):
    """The item's JSON does not have the STAC shape (properties or assets not objects)."""


class TooManyChipsError(GridError):
    """The grid has more chips than the per-item bound (`max_chips`)."""

    def __init__(self, message: str, *, chips: int, limit: int) -> None:
        super().__init__(message)
        self.chips = chips
        self.limit = limit


class NoCRSError(GridError):
    """Neither the item nor any asset carries a CRS pyproj understands."""


class CRSUnitError(GridError):
    """The CRS is not projected in metres, so pixel-sized chips have no fixed ground size."""


class NoGeoreferenceError(GridError):
    """No `proj:shape` or `proj:transform` on the item or its assets."""


class AssetGridError(GridError):
    """An asset's pixel grid is not the finest grid coarsened by an integer factor."""


class ChipSizeError(GridError):
    """The chip size is not a positive integer or does not fit the scene."""


@dataclass(frozen=True)
class ItemView:
    """The parts of a STAC item the grid and quality code read, from a dict or a pystac Item.

    Accepting both keeps callers free to pass what they have (processors hold pystac Items,
    tests and the database hold dicts) without converting back and forth.
    """

    id: str
    properties: Mapping[str, Any]
    assets: Mapping[str, Mapping[str, Any]]
    collection: str = ""
    geometry: Mapping[str, Any] | None = None


def item_view(item: Any) -> ItemView:
    """Read id, properties and assets (each with its absolute `href`) of a dict or pystac Item."""
    if isinstance(item, ItemView):
        return item
    if isinstance(item, Mapping):
        item_id = str(item.get("id", "<no id>"))
        properties = item.get("properties")
        properties = {} if properties is None else properties
        assets = item.get("assets")
        assets = {} if assets is None else assets
        # JSON from anywhere: a list where an object belongs must be a one-line error here,
        # not an AttributeError deep in the grid or quality code.
        if not isinstance(properties, Mapping):
            raise ItemFormatError(
                f"item {item_id}: properties is a JSON {type(properties).__name__}, not an "
                "object; fix the item"
            )
        if not isinstance(assets, Mapping):
            raise ItemFormatError(
                f"item {item_id}: assets is a JSON {type(assets).__name__}, not an object of "
                "assets by key; fix the item"
            )
        for key, asset in assets.items():
            if not isinstance(asset, Mapping):
                raise ItemFormatError(
                    f"item {item_id}: asset {key!r} is a JSON {type(asset).__name__}, not an "
                    "object; fix the item"
                )
        return ItemView(
            id=item_id,
            properties=properties,
            assets=assets,
            collection=str(item.get("collection") or ""),
            geometry=item.get("geometry"),
        )
    assets: dict[str, dict[str, Any]] = {}
    for key, asset in item.assets.items():
        fields = dict(asset.extra_fields)
        href = asset.href
        # Only relative hrefs are resolved against the item's self link: pystac would also
        # turn a local absolute path into a path on the self link's (remote) host.
        if not (href.startswith("/") or "://" in href):
            href = asset.get_absolute_href() or href
        fields["href"] = href
        assets[key] = fields
    return ItemView(
        id=str(item.id),
        properties=item.properties,
        assets=assets,
        collection=str(item.collection_id or ""),
        geometry=item.geometry,
    )


def _crs_from_fields(fields: Mapping[str, Any], item_id: str, where: str) -> pyproj.CRS | None:
    for key in CRS_KEYS:
        value = fields.get(key)
        if value is None:
            continue
        try:
            if key == "proj:epsg":
                return pyproj.CRS.from_epsg(int(value))
            if key == "proj:projjson":
                return pyproj.CRS.from_json_dict(value)
            return pyproj.CRS.from_user_input(value)
        except (pyproj.exceptions.CRSError, TypeError, ValueError) as e:
            raise NoCRSError(
                f"item {item_id}: {where} has {key}={str(value)[:80]!r}, which is not a CRS "
                f"pyproj understands ({e}); fix the item's projection fields"
            ) from e
    return None


def item_crs(item: Any, *, prefer_asset: str | None = None) -> pyproj.CRS:
    """The item's CRS, checked to be projected in metres.

    Looked up on the item's properties first, then on `prefer_asset` (the asset the grid comes
    from), then on any asset; from `proj:code`, `proj:epsg`, `proj:wkt2` or `proj:projjson`
    (pystac >= 1.12 rewrites `proj:epsg` as `proj:code`, older items only have `proj:epsg`).
    """
    view = item_view(item)
    crs = _crs_from_fields(view.properties, view.id, "the item")
    keys = list(view.assets)
    if prefer_asset in view.assets:
        keys.remove(prefer_asset)
        keys.insert(0, prefer_asset)
    for key in keys:
        if crs is not None:
            break
        crs = _crs_from_fields(view.assets[key], view.id, f"asset {key!r}")
    if crs is None:
        raise NoCRSError(
            f"item {view.id}: no CRS found; add one of {', '.join(CRS_KEYS)} to the item's "
            "properties or to its assets"
        )
    units = {axis.unit_name for axis in crs.axis_info}
    if not crs.is_projected or not units <= _METRE_UNITS:
        raise CRSUnitError(
            f"item {view.id}: CRS {crs.to_string()!r} has axis units {sorted(units)}, but chips "
            "need a projected CRS in metres; reproject the scene to a metric CRS (e.g. UTM) first"
        )
    return crs


def _as_shape(value: Any, item_id: str, where: str) -> tuple[int, int]:
    try:
        numbers = [float(v) for v in value]
    except (TypeError, ValueError) as e:
        raise NoGeoreferenceError(
            f"item {item_id}: {where} proj:shape={value!r} is not [height, width]; fix it or "
            "pass an explicit shape"
        ) from e
    # Checked here, before anything is sized from it: int(inf) raises OverflowError, and a
    # fractional or negative shape would give a grid that does not exist.
    whole = all(math.isfinite(v) and v >= 1 and v.is_integer() for v in numbers)
    if len(numbers) != 2 or not whole:
        raise NoGeoreferenceError(
            f"item {item_id}: {where} proj:shape={value!r} is not two positive whole numbers "
            "[height, width]; fix it or pass an explicit shape"
        )
    height, width = (int(v) for v in numbers)
    return height, width


def _as_transform(value: Any, item_id: str, where: str) -> Affine:
    try:
        coefficients = [float(v) for v in list(value)[:6]]
        transform = Affine(*coefficients)
    except (TypeError, ValueError) as e:
        raise NoGeoreferenceError(
            f"item {item_id}: {where} proj:transform={value!r} is not six affine coefficients "
            "(a, b, c, d, e, f); fix the item"
        ) from e
    if not all(math.isfinite(v) for v in coefficients):
        raise NoGeoreferenceError(
            f"item {item_id}: {where} proj:transform={value!r} has a value that is not a finite "
            "number; fix the item"
        )
    if transform.is_degenerate:
        raise NoGeoreferenceError(
            f"item {item_id}: {where} proj:transform={value!r} is degenerate (zero pixel size)"
        )
    return transform


def _finest_asset(view: ItemView) -> str | None:
    """Key of the asset with the smallest pixel (ties: the largest shape), or None."""
    best: tuple[float, int, str] | None = None
    for key, fields in view.assets.items():
        if fields.get("proj:transform") is None:
            continue
        transform = _as_transform(fields["proj:transform"], view.id, f"asset {key!r}")
        shape = fields.get("proj:shape")
        pixels = _as_shape(shape, view.id, f"asset {key!r}") if shape is not None else (0, 0)
        rank = (abs(transform.determinant), -pixels[0] * pixels[1], key)
        if best is None or rank[:2] < best[:2]:
            best = rank
    return None if best is None else best[2]


def item_georeference(
    item: Any, *, shape: tuple[int, int] | None = None
) -> tuple[tuple[int, int], Affine, str | None]:
    """`(shape, transform, asset key or None)` of the item's finest pixel grid.

    The item's own `proj:shape`/`proj:transform` win (Landsat, NAIP); otherwise the finest
    asset's (Sentinel-2 carries them only on assets); `shape`, when given, replaces the shape.
    The asset key (None when everything came from the item) names where the grid came from.
    """
    view = item_view(item)
    props = view.properties
    transform_value = props.get("proj:transform")
    shape_value = props.get("proj:shape") if shape is None else shape
    source: str | None = None
    if transform_value is None or shape_value is None:
        source = _finest_asset(view)
        if source is not None:
            fields = view.assets[source]
            if transform_value is None:
                transform_value = fields["proj:transform"]
            if shape_value is None:
                shape_value = fields.get("proj:shape")
    if transform_value is None or shape_value is None:
        missing = "proj:transform" if transform_value is None else "proj:shape"
        raise NoGeoreferenceError(
            f"item {view.id}: no {missing} on the item or any asset; add proj:shape and "
            "proj:transform to the item (or pass an explicit shape if only the shape is missing)"
        )
    where = "the item" if source is None else f"asset {source!r}"
    return (
        _as_shape(shape_value, view.id, where),
        _as_transform(transform_value, view.id, where),
        source,
    )


@lru_cache(maxsize=32)
def _from_wgs84(crs: pyproj.CRS) -> pyproj.Transformer:
    """The transformer from EPSG:4326 (lon, lat) to `crs`, built once per CRS."""
    return pyproj.Transformer.from_crs(_WGS84, crs, always_xy=True)


@lru_cache(maxsize=32)
def _to_wgs84(crs: pyproj.CRS) -> pyproj.Transformer:
    """The transformer from `crs` to EPSG:4326 (lon, lat); built once per CRS (1.5 ms each).

    pyproj transformers are thread-safe (pyproj >= 3.1), so one is shared by all threads.
    """
    return pyproj.Transformer.from_crs(crs, _WGS84, always_xy=True)


@dataclass(frozen=True)
class ChipGrid:
    """The chips of one item: `y_size` rows of `x_size` chips of `chip_size` pixels.

    `transform` and `shape` describe the finest pixel grid; chip `(x, y)` covers its pixels
    `[y*cs, (y+1)*cs) x [x*cs, (x+1)*cs)`. Arrays returned here are in row-major chip order
    (by y, then x), the order the index and the database use.
    """

    item_id: str
    crs: pyproj.CRS
    transform: Affine
    shape: tuple[int, int]
    chip_size: int

    @property
    def x_size(self) -> int:
        """Number of whole chips along a row."""
        return self.shape[1] // self.chip_size

    @property
    def y_size(self) -> int:
        """Number of whole chip rows."""
        return self.shape[0] // self.chip_size

    @property
    def size(self) -> int:
        """Number of chips."""
        return self.x_size * self.y_size

    def indices(self) -> tuple[np.ndarray, np.ndarray]:
        """`(chip_index_x, chip_index_y)` as int32 arrays, ordered by y then x."""
        ys, xs = np.divmod(np.arange(self.size, dtype=np.int32), np.int32(self.x_size))
        return xs, ys

    @cached_property
    def _corners_lonlat(self) -> np.ndarray:
        """Lon/lat of the chip-corner lattice, shape `(y_size + 1, x_size + 1, 2)`."""
        cols = np.arange(self.x_size + 1, dtype=np.float64) * self.chip_size
        rows = np.arange(self.y_size + 1, dtype=np.float64) * self.chip_size
        cc, rr = np.meshgrid(cols, rows)
        t = self.transform
        xs = t.a * cc + t.b * rr + t.c
        ys = t.d * cc + t.e * rr + t.f
        lon, lat = _to_wgs84(self.crs).transform(xs.ravel(), ys.ravel(), errcheck=False)
        lonlat = np.stack([lon, lat], axis=-1).reshape(*cc.shape, 2)
        if not np.isfinite(lonlat).all():
            raise GridError(
                f"item {self.item_id}: some chip corners cannot be reprojected from "
                f"{self.crs.to_string()!r} to EPSG:4326; check the item's CRS and transform"
            )
        return lonlat

    def _rings(self, chips: np.ndarray | None) -> np.ndarray:
        """Closed exterior rings `(n, 5, 2)` of the chips (see `footprints`), counter-clockwise."""
        ll = self._corners_lonlat
        # Corner lattice index (row, col) offsets of each ring vertex relative to the chip's
        # top-left corner: BR, TR, TL, BL, BR (closed ring).
        drow = np.array([1, 0, 0, 1, 1])
        dcol = np.array([1, 1, 0, 0, 1])
        chips = np.arange(self.size) if chips is None else np.asarray(chips)
        ys, xs = np.divmod(chips, self.x_size)
        ring = ll[ys[:, None] + drow, xs[:, None] + dcol]  # (size, 5, 2)
        # Shoelace sign per ring; reverse the clockwise ones (a south-up or mirrored grid).
        x, y = ring[:, :-1, 0], ring[:, :-1, 1]
        twice_area = (x * np.roll(y, -1, axis=1) - np.roll(x, -1, axis=1) * y).sum(axis=1)
        ring[twice_area < 0] = ring[twice_area < 0, ::-1]
        return ring

    def footprints(self, chips: np.ndarray | None = None) -> np.ndarray:
        """Chip footprints as shapely Polygons in EPSG:4326, ordered by y then x.

        `chips` selects chips by their position in that order (`y * x_size + x`), so callers
        that drop chips do not pay for their polygons. Rings follow `shapely.box`: bottom-right,
        top-right, top-left, bottom-left (for a north-up grid), oriented counter-clockwise
        whatever the grid's handedness.
        """
        import shapely  # only here: footprints_wkb, the index's path, needs no geometry objects

        return shapely.polygons(self._rings(chips))

    def footprints_wkb(self, chips: np.ndarray | None = None) -> np.ndarray:
        """Chip footprints as WKB bytes (object array); `chips` as in `footprints`.

        The same bytes as `shapely.to_wkb(self.footprints(chips))` on a little-endian machine
        (here always little-endian): one 93-byte 2D Polygon per chip, written by numpy.
        """
        rings = self._rings(chips)
        records = np.empty(len(rings), dtype=_POLYGON_WKB)
        records["byte_order"] = 1
        records["type"] = 3
        records["rings"] = 1
        records["points"] = 5
        records["xy"] = rings.reshape(len(rings), 10)
        return records.view(f"V{_POLYGON_WKB.itemsize}").astype(object)

    def locations(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """The location keys of chips `(xs, ys)` of this grid, int64 (`location_key`)."""
        return grid_locations(self.crs, self.transform, self.chip_size, xs, ys)

    def alignment(self, transform: Affine, *, asset: str = "asset") -> tuple[int, int, int, int]:
        """`(fx, fy, col0, row0)` of another pixel grid relative to this one.

        That grid's pixels are `fx x fy` pixels of this grid and its pixel (0, 0) starts at
        this grid's pixel `(col0, row0)`. Raises AssetGridError unless the factors are positive
        integers, the grid is not rotated relative to this one and its origin falls on a pixel
        corner of this grid: only then does each chip map to a fixed block of its pixels.
        """
        rel = ~self.transform @ transform  # asset pixel -> finest-grid pixel
        values = np.array([rel.a, rel.e, rel.c, rel.f])
        rounded = np.round(values)
        if (
            abs(rel.b) > _PIXEL_TOL
            or abs(rel.d) > _PIXEL_TOL
            or np.any(np.abs(values - rounded) > _PIXEL_TOL * np.maximum(1.0, np.abs(values)))
            or rounded[0] < 1
            or rounded[1] < 1
        ):
            raise AssetGridError(
                f"item {self.item_id}: {asset} grid {tuple(transform)[:6]} is not the item's "
                f"finest grid {tuple(self.transform)[:6]} coarsened by an integer factor with an "
                "aligned origin; resample the asset onto the item's grid (or an integer multiple)"
            )
        fx, fy, col0, row0 = (int(v) for v in rounded)
        return fx, fy, col0, row0

    def window(
        self, x: int, y: int, transform: Affine | None = None, *, asset: str = "asset"
    ) -> Window:
        """rasterio Window of chip `(x, y)` in a grid `transform` (default: the finest grid).

        For a coarser asset (20 m beside 10 m) the window is scaled by the integer factor; its
        offsets and size are fractional when the factor does not divide the chip size.
        """
        if not (0 <= x < self.x_size and 0 <= y < self.y_size):
            raise ChipSizeError(
                f"item {self.item_id}: chip ({x}, {y}) is outside the {self.x_size} x "
                f"{self.y_size} chip grid"
            )
        return self._window(x * self.chip_size, y * self.chip_size, 1, 1, transform, asset)

    def grid_window(self, transform: Affine | None = None, *, asset: str = "asset") -> Window:
        """rasterio Window covering all chips (not the unchipped margin) in a grid `transform`."""
        return self._window(0, 0, self.x_size, self.y_size, transform, asset)

    def _window(
        self, col: int, row: int, nx: int, ny: int, transform: Affine | None, asset: str
    ) -> Window:
        fx, fy, col0, row0 = (
            (1, 1, 0, 0) if transform is None else self.alignment(transform, asset=asset)
        )
        cs = self.chip_size

        def scaled(value: int, factor: int) -> int | float:
            return value // factor if value % factor == 0 else value / factor

        return Window(
            scaled(col - col0, fx),
            scaled(row - row0, fy),
            scaled(nx * cs, fx),
            scaled(ny * cs, fy),
        )


def chip_grid(
    item: Any,
    *,
    chip_size: int = CHIP_SIZE,
    shape: tuple[int, int] | None = None,
    max_chips: int | None = MAX_CHIPS,
) -> ChipGrid:
    """The chip grid of a STAC item (pystac Item or dict).

    Raises a GridError subclass, naming the item, when there is no CRS, the CRS is not metric,
    shape or transform are missing or not finite (shape: positive whole numbers), the chip
    size does not fit the scene, or the grid has more than `max_chips` chips
    (`TooManyChipsError`; None: no bound, for readers of chips already indexed).
    """
    view = item_view(item)
    if isinstance(chip_size, bool) or not isinstance(chip_size, int | np.integer) or chip_size < 1:
        raise ChipSizeError(
            f"item {view.id}: chip size {chip_size!r} is not a positive whole number of pixels"
        )
    grid_shape, transform, source = item_georeference(view, shape=shape)
    crs = item_crs(view, prefer_asset=source)
    height, width = grid_shape
    if chip_size > height or chip_size > width:
        raise ChipSizeError(
            f"item {view.id}: chip size {chip_size} px is larger than the scene ({height} x "
            f"{width} px); pass a chip size of at most {min(height, width)}"
        )
    chips = (height // chip_size) * (width // chip_size)
    if max_chips is not None and chips > max_chips:
        raise TooManyChipsError(
            f"item {view.id}: {chips:,} chips ({height} x {width} px in chips of {chip_size} "
            f"px), more than `max_chips` {max_chips:,}; use a larger `chip_size`, check the "
            "item's proj:shape, or raise `max_chips`",
            chips=chips,
            limit=max_chips,
        )
    return ChipGrid(
        item_id=view.id, crs=crs, transform=transform, shape=grid_shape, chip_size=int(chip_size)
    )


def asset_transform(item: Any, key: str) -> Affine:
    """The pixel grid of asset `key`: its own `proj:transform`, else the item's.

    Lets callers compute windows from metadata alone (without opening the file).
    """
    view = item_view(item)
    if key not in view.assets:
        raise GridError(
            f"item {view.id}: no asset {key!r}; it has {', '.join(sorted(view.assets))}"
        )
    value = view.assets[key].get("proj:transform", view.properties.get("proj:transform"))
    if value is None:
        raise NoGeoreferenceError(
            f"item {view.id}: neither asset {key!r} nor the item has proj:transform; add it"
        )
    return _as_transform(value, view.id, f"asset {key!r}")


def outside_footprint(grid: ChipGrid, item: Any) -> Any:
    """The chipped area outside the item's `geometry`, a shapely geometry in the grid's CRS.

    None when the item has no geometry or the geometry covers every chip. The pixel grid
    (`proj:shape`) is a rectangle; the scene's data is often a smaller shape inside it (an
    orbit's edge cutting a Sentinel-2 tile, a Landsat scene turned on its grid). Vertices are
    reprojected one by one, without densifying the lon/lat edges: catalogs write geometries by
    reprojecting the native footprint's vertices, so this gives back its straight native edges
    (densified lon/lat edges would cut slivers off full scenes).
    """
    import shapely  # geometry objects only here; the index's footprints are written by numpy
    from shapely.geometry import shape

    geometry = item_view(item).geometry
    if not geometry:
        return None
    try:
        footprint = shape(geometry)
    except (AttributeError, KeyError, TypeError, ValueError, shapely.errors.ShapelyError) as e:
        raise GridError(
            f"item {grid.item_id}: geometry is not a GeoJSON geometry ({e}); fix the item"
        ) from e
    transformer = _from_wgs84(grid.crs)

    def to_crs(lonlat: np.ndarray) -> np.ndarray:
        x, y = transformer.transform(lonlat[:, 0], lonlat[:, 1], errcheck=False)
        return np.column_stack([x, y])

    native = shapely.transform(footprint, to_crs)
    if not np.isfinite(shapely.get_coordinates(native)).all():
        raise GridError(
            f"item {grid.item_id}: its geometry cannot be reprojected to "
            f"{grid.crs.to_string()!r}; check the item's geometry and CRS"
        )
    if not native.is_valid:
        native = shapely.make_valid(native)
    width, height = grid.x_size * grid.chip_size, grid.y_size * grid.chip_size
    t = grid.transform
    chipped = shapely.Polygon([t @ (0, 0), t @ (width, 0), t @ (width, height), t @ (0, height)])
    outside = chipped.difference(native)
    return None if outside.is_empty else outside


# -- chip locations -----------------------------------------------------------------------------

LOCATION_DECIMALS = 6
"""Decimals (of a CRS unit: micrometres) of the numbers in a location's text: far below a
pixel, far above the float noise of transforms written by different tools."""


@lru_cache(maxsize=32)
def crs_name(crs: pyproj.CRS) -> str:
    """The CRS as a location's text names it: `EPSG:<code>` when it has one, else its WKT2.

    By code rather than by text, so that `proj:epsg`, `proj:code` and a WKT of one EPSG CRS
    name the same place. Finding the code takes milliseconds: call it once per grid.
    """
    code = crs.to_epsg()
    return f"EPSG:{code}" if code is not None else crs.to_wkt()


def _number(value: float) -> str:
    rounded = round(float(value), LOCATION_DECIMALS) + 0.0  # + 0.0: no "-0.000000"
    return f"{rounded:.{LOCATION_DECIMALS}f}"


def _location_prefix(crs: pyproj.CRS, transform: Affine, chip_size: int) -> str:
    """What every chip of one grid shares in its location text: CRS, pixel, chip size."""
    pixel = "|".join(_number(v) for v in (transform.a, transform.b, transform.d, transform.e))
    return f"{crs_name(crs)}|{pixel}|{int(chip_size)}|"


def location_text(crs: pyproj.CRS, transform: Affine, chip_size: int, x: float, y: float) -> str:
    """The canonical text of a chip location: CRS, pixel size and orientation (the transform's
    a, b, d, e), chip size in pixels, and the chip's top-left corner `(x, y)` in CRS units:
    `EPSG:32633|10.000000|0.000000|0.000000|-10.000000|256|399960.000000|5000040.000000`."""
    return f"{_location_prefix(crs, transform, chip_size)}{_number(x)}|{_number(y)}"


def location_key(text: str) -> int:
    """The first 64 bits of md5 of `text`, as a signed bigint (as SQL's
    `('x' || substr(md5(text), 1, 16))::bit(64)::bigint`)."""
    return int.from_bytes(hashlib.md5(text.encode()).digest()[:8], "big", signed=True)


def grid_locations(
    crs: pyproj.CRS, transform: Affine, chip_size: int, xs: np.ndarray, ys: np.ndarray
) -> np.ndarray:
    """Location keys (int64) of chips `(xs, ys)` of the grid `transform` in `crs`.

    Chips with the same CRS, pixel size, chip size and top-left corner cover the same ground
    on the same pixels, whatever their item or date, and so have the same key: two dates of one
    Sentinel-2 tile share every location; another tile, CRS, or chip size shares none.
    """
    cols = np.asarray(xs, dtype=np.float64) * chip_size
    rows = np.asarray(ys, dtype=np.float64) * chip_size
    t = transform
    corner_x = t.a * cols + t.b * rows + t.c
    corner_y = t.d * cols + t.e * rows + t.f
    # The grid's part of the text once, not per chip (finding the CRS's code takes milliseconds)
    prefix = _location_prefix(crs, transform, chip_size)
    return np.fromiter(
        (
            location_key(f"{prefix}{_number(cx)}|{_number(cy)}")
            for cx, cy in zip(corner_x.tolist(), corner_y.tolist(), strict=True)
        ),
        dtype=np.int64,
        count=len(cols),
    )
