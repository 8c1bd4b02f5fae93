"""Chip rows as binary COPY data: one encoder, parameterised by the row layout.

Both write paths send chip rows by `COPY … FROM STDIN WITH (FORMAT binary)`: `store_items`
into its temp table (`item_no` points at the item), `bulk_load` straight into
`stacchip.chips` (collection, item id, chip size and datetime on every row). The rows differ
only in their columns, so `copy_chip_rows` takes the column list and builds the rows of any
layout of the columns it knows (`ITEM_FIELDS`, `CHIP_FIELDS`).

It builds them with numpy record arrays, no per-chip Python objects: a record array per run
of items whose leading text fields have the same length, and within it per WKB length (every
4-corner polygon is 93 bytes, so usually one). Binary COPY (PostgreSQL's "COPY, Binary
Format"): a 19-byte header; per row the field count (int16), then per field its length
(int32) and its bytes, big-endian; a -1 (int16) trailer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa

from stacchip_db.db.items import ItemError

COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
COPY_TRAILER = (-1).to_bytes(2, "big", signed=True)

_TEXT = "text"
_WKB = "wkb"
ITEM_FIELDS: dict[str, str] = {
    "item_no": ">i4",  # the item's position in the tables given
    "collection": _TEXT,
    "item_id": _TEXT,
    "chip_size": ">i4",
    "datetime": ">i8",  # timestamptz: microseconds since 2000-01-01 UTC
}
"""Columns with one value per item (numpy type of the field, or text), from `item_values`."""
CHIP_FIELDS: dict[str, str] = {
    "chip_index_x": ">i4",
    "chip_index_y": ">i4",
    "cloud_fraction": ">f4",
    "nodata_fraction": ">f4",
    "geometry": _WKB,  # bytea or geometry: the chips table's WKB as it is
}
"""Columns with one value per chip, read from the chips tables."""
_ARROW_TYPES = {">i4": pa.int32(), ">f4": pa.float32()}

_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)  # binary timestamptz: microseconds since then
_MICROSECOND = timedelta(microseconds=1)


def copy_chip_rows(
    columns: Sequence[str],
    tables: Sequence[pa.Table],
    item_values: Mapping[str, Sequence[Any]] | None = None,
    *,
    key_order: bool = False,
) -> tuple[list[bytes], int]:
    """Binary COPY data of the chips of `tables` in the layout `columns`, as parts; its rows.

    `tables[i]` are the chips of item i (columns of `CHIP_FIELDS`, as `index_item` returns
    them); `item_values[name][i]` is item i's value of each column of `ITEM_FIELDS` in
    `columns` but `item_no` (which is i). Text columns must come first: with the field count
    they are each item's leading bytes. Rows come item by item, then (`key_order`) by chip x
    and y, or in the tables' order; within that, rows of one WKB length are sent together.
    The parts are written one by one, so the data is never joined into one more copy.
    """
    item_values = item_values or {}
    texts = _check_layout(columns, item_values, len(tables))
    counts = np.array([t.num_rows for t in tables], dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return [COPY_HEADER, COPY_TRAILER], 0
    chips = _chip_arrays(tables)
    offsets, data, wkb_lengths = chips.offsets, chips.data, chips.wkb_lengths
    # Each item's head: field count and text fields; runs of items with heads of one length
    # share a record array (a numpy record has one fixed size).
    heads = [
        b"".join(
            [
                len(columns).to_bytes(2, "big"),
                *(_text_field(item_values[name][i]) for name in columns[:texts]),
            ]
        )
        for i in range(len(tables))
    ]
    head_lengths = np.array([len(h) for h in heads], dtype=np.int64)
    per_item = _item_arrays(columns[texts:], item_values, len(tables))
    item_of_row = np.repeat(np.arange(len(tables)), counts)
    if key_order:
        order = np.lexsort(
            (chips.columns["chip_index_y"], chips.columns["chip_index_x"], item_of_row)
        )
    else:
        order = np.arange(total)
    common = int(wkb_lengths[0])
    wkb = None  # every WKB of one size (4-corner polygons): rows of a 2D view
    if (wkb_lengths == common).all():
        wkb = data[offsets[0] : offsets[0] + total * common].reshape(total, common)
    first_rows = np.concatenate([[0], np.cumsum(counts)])
    starts = np.flatnonzero(np.diff(head_lengths, prepend=-1))
    parts = [COPY_HEADER]
    for a, b in zip(starts, [*starts[1:], len(tables)], strict=True):
        run = order[first_rows[a] : first_rows[b]]
        head_array = np.frombuffer(b"".join(heads[a:b]), f"V{head_lengths[a]}")
        for size in np.unique(wkb_lengths[run]) if wkb is None else [common]:
            rows = run if wkb is not None else run[wkb_lengths[run] == size]
            record = np.empty(len(rows), dtype=_record_type(columns[texts:], head_lengths[a], size))
            items = item_of_row[rows]
            record["head"] = head_array[0] if texts == 0 else head_array[items - a]
            for name in columns[texts:]:
                if name == "geometry":
                    record["n_geometry"] = size
                    if wkb is None:
                        record["geometry"] = data[offsets[rows][:, None] + np.arange(size)]
                    elif len(rows) == total and not key_order:  # all rows, in order
                        record["geometry"] = wkb
                    else:
                        record["geometry"] = wkb[rows]
                    continue
                record[f"n_{name}"] = np.dtype(_field_type(name)).itemsize
                if name in per_item:
                    record[name] = per_item[name][items]
                else:
                    record[name] = chips.columns[name][rows]
            parts.append(record.tobytes())
    parts.append(COPY_TRAILER)
    return parts, total


def _field_type(name: str) -> str:
    return ITEM_FIELDS.get(name) or CHIP_FIELDS[name]


def _check_layout(
    columns: Sequence[str], item_values: Mapping[str, Sequence[Any]], items: int
) -> int:
    """The number of leading text columns; `ValueError` for a layout the encoder cannot build
    (a mistake in the calling code, not in the data)."""
    unknown = [name for name in columns if name not in ITEM_FIELDS and name not in CHIP_FIELDS]
    if unknown:
        raise ValueError(f"no COPY encoding for column {', '.join(unknown)}")
    kinds = [_field_type(name) for name in columns]
    texts = next((i for i, kind in enumerate(kinds) if kind != _TEXT), len(kinds))
    if _TEXT in kinds[texts:]:
        raise ValueError(f"text columns must lead the layout: {', '.join(columns)}")
    for name in columns:
        if name in ITEM_FIELDS and name != "item_no":
            if name not in item_values:
                raise ValueError(f"column {name}: no value per item in `item_values`")
            if len(item_values[name]) != items:
                raise ValueError(f"column {name}: {len(item_values[name])} values, {items} items")
    return texts


def _item_arrays(
    columns: Sequence[str], item_values: Mapping[str, Sequence[Any]], items: int
) -> dict[str, np.ndarray]:
    """The fixed-width per-item columns of the layout, one value per item."""
    arrays: dict[str, np.ndarray] = {}
    for name in columns:
        if name == "item_no":
            arrays[name] = np.arange(items, dtype=np.int32)
        elif name == "datetime":
            arrays[name] = np.array(
                [(when - _PG_EPOCH) // _MICROSECOND for when in item_values[name]], np.int64
            )
        elif name in ITEM_FIELDS:
            arrays[name] = np.array(item_values[name], dtype=np.int32)
    return arrays


def _record_type(columns: Sequence[str], head_length: int, wkb_length: int) -> np.dtype:
    """The numpy record of one row: the head, then per column its length and value."""
    fields: list[tuple[Any, ...]] = [("head", f"V{head_length}")]
    for name in columns:
        fields.append((f"n_{name}", ">i4"))
        if name == "geometry":
            fields.append(("geometry", np.uint8, (int(wkb_length),)))
        else:
            fields.append((name, _field_type(name)))
    return np.dtype(fields)


def _text_field(text: str) -> bytes:
    encoded = text.encode()
    return len(encoded).to_bytes(4, "big") + encoded


def _column(table: pa.Table, name: str, arrow_type: pa.DataType) -> np.ndarray:
    """A fixed-width column as numpy, read from its buffer (`to_numpy` would import pandas)."""
    array = table.column(name).combine_chunks()
    if array.null_count:
        raise ItemError(f"chips column {name} has nulls; pass the table index_item returns")
    if array.type != arrow_type:
        array = array.cast(arrow_type)
    dtype = np.dtype(arrow_type.to_pandas_dtype())
    return np.frombuffer(
        array.buffers()[1], dtype=dtype, count=len(array), offset=array.offset * dtype.itemsize
    )


@dataclass
class _ChipArrays:
    """The chips of several index tables as flat numpy arrays (no per-chip Python objects)."""

    total: int
    offsets: np.ndarray  # int64, total + 1: row i's WKB is data[offsets[i]:offsets[i + 1]]
    data: np.ndarray  # uint8: all WKB bytes
    columns: dict[str, np.ndarray]  # chip_index_x/y (int32), cloud/nodata_fraction (float32)

    @property
    def wkb_lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def _chip_arrays(tables: Sequence[pa.Table]) -> _ChipArrays:
    """Concatenate `tables` and read their columns straight from the Arrow buffers."""
    total = sum(t.num_rows for t in tables)
    table = pa.concat_tables(tables, promote_options="default")  # nullability may differ
    geometry = table.column("geometry").combine_chunks()
    if not pa.types.is_binary(geometry.type):
        geometry = geometry.cast(pa.binary())
    if geometry.null_count:
        raise ItemError("chips column geometry has nulls; pass the table index_item returns")
    _, offsets_buf, data_buf = geometry.buffers()
    offsets = np.frombuffer(
        offsets_buf, dtype=np.int32, count=total + 1, offset=geometry.offset * 4
    ).astype(np.int64)
    return _ChipArrays(
        total=total,
        offsets=offsets,
        data=np.frombuffer(data_buf or b"", dtype=np.uint8),
        columns={
            name: _column(table, name, _ARROW_TYPES[kind])
            for name, kind in CHIP_FIELDS.items()
            if kind != _WKB
        },
    )
