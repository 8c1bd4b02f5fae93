"""`stacchip-db layer …`: auxiliary layers (vector features, categorical rasters) to select by.

A thin shell over `stacchip_db.layers`: option text is parsed here (`--classes 10=tree,…`),
the library does the rest.
"""

from __future__ import annotations

import json

import click

from stacchip_db.cli.options import with_database
from stacchip_db.db import Database, translate_errors


def parse_classes(text: str) -> dict[int, str]:
    """`10=tree,20=shrub` -> {10: "tree", 20: "shrub"}."""
    classes: dict[int, str] = {}
    for part in text.split(","):
        value, equals, name = part.strip().partition("=")
        try:
            number = int(value)
        except ValueError:
            number = None
        if not equals or number is None or not name.strip():
            raise click.BadParameter(
                f"{part.strip()!r} is not VALUE=NAME (10=tree,20=shrub)", param_hint="--classes"
            )
        if number in classes:
            raise click.BadParameter(f"value {number} is named twice", param_hint="--classes")
        classes[number] = name.strip()
    return classes


@click.group()
def layer() -> None:
    """Auxiliary layers: vector features and categorical rasters that select chips."""


@layer.command()
@click.argument("name")
@click.argument("source")
@click.option(
    "--column", "columns", multiple=True, metavar="COL",
    help="Vector: keep this attribute column (repeat); the first is the layer's strata for "
    "--stratify-by layer:NAME. Default: every column, no strata.",
)
@click.option("--raster", is_flag=True, help="SOURCE is a categorical raster (a COG of classes).")
@click.option(
    "--classes", metavar="VALUE=NAME,…",
    help="Raster: class names of pixel values (10=tree,20=shrub); other values are named by "
    "their number.",
)
@with_database
def add(
    name: str,
    source: str,
    columns: tuple[str, ...],
    raster: bool,
    classes: str | None,
    db: Database,
) -> None:
    """Add layer NAME from SOURCE (a file or URL: local, https://, s3://).

    Vector (GeoPackage, FlatGeobuf, GeoParquet, Shapefile, GeoJSON): loaded into table
    stacchip_layers.NAME (EPSG:4326, GiST-indexed). Raster (--raster): registered, and the
    class fractions of every stored chip computed; chips stored later get theirs when stored
    (or with `layer refresh`). All or nothing.
    """
    from stacchip_db import layers

    if raster and columns:
        raise click.BadParameter("--column is for vector layers", param_hint="--column")
    if classes is not None and not raster:
        raise click.BadParameter(
            "--classes is for raster layers (--raster)", param_hint="--classes"
        )
    with db.connect() as conn, translate_errors(f"adding layer {name}"):
        if raster:
            added, summary = layers.add_raster_layer(
                conn, name, source, classes=parse_classes(classes) if classes else None
            )
            click.echo(summary.describe(), err=True)
        else:
            added = layers.add_vector_layer(conn, name, source, columns=columns)
            click.echo(
                f"layer {name}: {added.features:,} features in stacchip_layers.{name}", err=True
            )


@layer.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print the layers as JSON.")
@with_database
def list_(as_json: bool, db: Database) -> None:
    """List the layers."""
    from stacchip_db import layers

    with db.connect() as conn, translate_errors("listing layers"):
        found = layers.list_layers(conn)
    if as_json:
        click.echo(json.dumps([layer.to_dict() for layer in found]))
        return
    for item in found:
        if item.kind == "vector":
            detail = f"{item.features or 0:,} features, columns {', '.join(item.columns) or '-'}"
            if item.stratum_column:
                detail += f", strata by {item.stratum_column}"
        else:
            names = ", ".join(f"{v}={n}" for v, n in item.classes) or "-"
            detail = f"{item.chips or 0:,} chips with fractions, classes {names}"
        click.echo(f"{item.name}\t{item.kind}\t{item.source}\t{detail}")


@layer.command()
@click.argument("name")
@with_database
def remove(name: str, db: Database) -> None:
    """Remove layer NAME (its table or its fractions)."""
    from stacchip_db import layers

    with db.connect() as conn, translate_errors(f"removing layer {name}"):
        layers.remove_layer(conn, name)
    click.echo(f"removed layer {name}", err=True)


@layer.command()
@click.argument("name")
@with_database
def refresh(name: str, db: Database) -> None:
    """Compute the class fractions that raster layer NAME lacks (chips stored since)."""
    from stacchip_db import layers

    with db.connect() as conn, translate_errors(f"refreshing layer {name}"):
        summary = layers.refresh_layer(conn, name)
    click.echo(summary.describe(), err=True)

