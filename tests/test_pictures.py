"""`preview` and `map`: PNGs of a selection, written and not blank."""

from __future__ import annotations

import copy
from pathlib import Path

import matplotlib.image
import numpy as np
import psycopg

from stacchip_db.pictures import stretch
from tests.conftest import error_line, run_cli, store_indexed

CHIP = 64


def _image(path: Path) -> np.ndarray:
    assert path.exists() and path.stat().st_size > 10_000
    return matplotlib.image.imread(path)


def _colours(image: np.ndarray) -> int:
    return len(np.unique((image[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0))


def test_stretch_maps_percentiles_to_the_unit_range() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(1, 5000, size=(3, 32, 32)).astype(np.uint16)
    pixels[:, :4, :4] = 0  # nodata corner
    rgb = stretch(pixels, 0)
    assert rgb.shape == (32, 32, 3)
    assert rgb.min() == 0 and rgb.max() == 1
    assert (rgb[:4, :4] == 0).all()
    valid = rgb[4:, 4:]
    assert 0.01 < (valid == 1).mean() < 0.05  # about 2 % above the 98th percentile


def test_preview_draws_the_selected_chips(
    database_url: str, s2_items: list[dict], tmp_path: Path
) -> None:
    store_indexed(database_url, s2_items[:1], chip_size=CHIP)
    out = tmp_path / "preview.png"
    result = run_cli(
        ["preview", "--max-cloud", "0.2", "-n", "9", "--seed", "3", "--out", str(out)],
        database_url=database_url,
    )
    assert result.exit_code == 0, result.output
    assert "drew 9 of 9 selected chips" in result.stdout
    image = _image(out)
    assert image.shape[0] > 600 and image.shape[1] > 600
    assert _colours(image) > 1000  # real imagery, not one flat colour


def test_map_draws_footprints(database_url: str, s2_items: list[dict], tmp_path: Path) -> None:
    store_indexed(database_url, s2_items[:1], chip_size=CHIP)
    out = tmp_path / "map.png"
    query = (
        "SELECT collection, item_id, chip_size, chip_index_x, chip_index_y FROM stacchip.chips"
    )
    result = run_cli(["map", "--query", query, "--out", str(out)], database_url=database_url)
    assert result.exit_code == 0, result.output
    assert "of 1 item into" in result.stdout
    image = _image(out)
    assert image.shape[:2] == (960, 960)
    assert _colours(image) > 20  # the cloud-fraction colour ramp, outlines, text


def test_empty_selection_is_a_one_line_error(database_url: str, tmp_path: Path) -> None:
    line = error_line(run_cli(["preview", "--out", str(tmp_path / "p.png")],
                              database_url=database_url))  # fmt: skip
    assert "nothing to preview" in line
    line = error_line(run_cli(["map", "--out", str(tmp_path / "m.png")],
                              database_url=database_url))  # fmt: skip
    assert "nothing to map" in line


def test_preview_of_unreadable_chips_names_them_and_exits_3(
    database_url: str, s2_items: list[dict], tmp_path: Path
) -> None:
    broken = copy.deepcopy(s2_items[0])
    for band in ("red", "green"):  # two of the three RGB assets gone: still one failure a chip
        broken["assets"][band]["href"] = str(tmp_path / f"gone-{band}.tif")
    store_indexed(database_url, [broken], chip_size=CHIP)
    out = tmp_path / "preview.png"
    result = run_cli(
        ["preview", "-n", "4", "--seed", "1", "--out", str(out)], database_url=database_url
    )
    assert result.exit_code == 3, result.output
    assert "drew 0 of 4 selected chips" in result.stdout
    assert "4 chips could not be read" in result.stdout
    named = [line for line in result.stderr.splitlines() if "cannot read" in line]
    assert len(named) == 4, result.stderr
    assert all(f"chip {broken['id']}-" in line and "gone-" in line for line in named)
    assert out.exists()  # the picture is still written, with blank tiles


VIRIDIS_TOP = np.array([253, 231, 37])  # the colour bar's 1.0; drawn only when there are clouds
LAND = np.array([238, 238, 238])  # the Natural Earth countries' fill


def _has_colour(image: np.ndarray, rgb: np.ndarray, tolerance: int = 3) -> bool:
    pixels = (image[..., :3] * 255).round().astype(int).reshape(-1, 3)
    return bool((np.abs(pixels - rgb).max(axis=1) <= tolerance).any())


def test_cloud_map_has_a_colour_bar(database_url: str, s2_items: list[dict], tmp_path: Path
                                    ) -> None:  # fmt: skip
    store_indexed(database_url, s2_items[:1], chip_size=CHIP)
    out = tmp_path / "map.png"
    result = run_cli(["map", "--out", str(out)], database_url=database_url)
    assert result.exit_code == 0, result.output
    assert _has_colour(_image(out), VIRIDIS_TOP)


def test_many_chips_without_clouds_are_binned_over_countries_without_a_colour_bar(
    database_url: str, fixtures_dir: Path, tmp_path: Path
) -> None:
    from stacchip_db.pictures import MAX_POLYGONS

    line = (fixtures_dir / "naip-planetary-computer-200.ndjson").read_text().splitlines()[0]
    items = tmp_path / "naip.ndjson"
    items.write_text(line + "\n")
    indexed = run_cli(["index", "--quality", "none", "--chip-size", "64", str(items)],
                      database_url=database_url)  # fmt: skip
    assert indexed.exit_code == 0, indexed.output
    with psycopg.connect(database_url) as conn:
        chips = conn.execute("SELECT count(*) FROM stacchip.chips").fetchone()[0]
    assert chips > MAX_POLYGONS
    out = tmp_path / "map.png"
    result = run_cli(["map", "--out", str(out)], database_url=database_url)
    assert result.exit_code == 0, result.output
    assert f"map: drawing {chips} chips of 1 item binned" in result.stderr
    assert f"selected {chips} chips" in result.stderr  # progress while the selection loads
    image = _image(out)
    assert not _has_colour(image, VIRIDIS_TOP)  # NAIP has no clouds: no cloud colour bar
    assert _has_colour(image, LAND)  # the item sits on land: the countries are drawn around it
