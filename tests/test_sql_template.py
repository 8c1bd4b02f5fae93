"""The `sql/` template: the filter block written once, its markers, and a new filter as one edit."""

from __future__ import annotations

import psycopg
import pytest

from stacchip_db.db.migrate import sql_files, sql_text
from stacchip_db.db.sql_template import (
    SELECTION_SQL,
    Parameter,
    TemplateError,
    expand,
    parse_filters,
    selection_filters,
)
from stacchip_db.resources import resource_dir
from stacchip_db.synthetic import fill_chips

TEMPLATE = """\
-- head
{{filters}}
    a int DEFAULT NULL,  -- the first
    b float8[] DEFAULT '{1,2}'
{{end filters}}
CREATE FUNCTION f(
    n int,
    {{filter_parameters}}
) AS $$ SELECT g({{filter_arguments f.}}), h(
        {{filter_arguments f.}}
    ) $$;
EXECUTE 'SELECT k({{filter_arguments $5}})' USING x, {{filter_values}};
"""


EXPANDED = """\
-- head
CREATE FUNCTION f(
    n int,
    a int DEFAULT NULL,
    b float8[] DEFAULT '{1,2}'
) AS $$ SELECT g(a => f.a, b => f.b), h(
        a => f.a,
        b => f.b
    ) $$;
EXECUTE 'SELECT k(a => $5, b => $6)' USING x, a, b;
"""


def test_markers_expand_to_the_filter_block() -> None:
    assert parse_filters(TEMPLATE) == (
        Parameter("a", "int", "NULL"),
        Parameter("b", "float8[]", "'{1,2}'"),
    )
    assert expand(TEMPLATE) == EXPANDED


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{{filters}}\n    a int,\n{{end filters}}\n", "not `name type DEFAULT value`"),
        ("{{filters}}\n a int DEFAULT 1\n a text DEFAULT 2\n{{end filters}}\n", "twice"),
        ("{{filters}}\n a int DEFAULT 1\n{{end filters}}\n{{filter_names}}", "unknown marker"),
        ("{{filters}}\n a int DEFAULT 1\n{{end filters}}\n{{filter_arguments f}}", "and a dot"),
        ("{{filters}}\n a int DEFAULT 1\n{{end filters}}\n{{ filter_values", "malformed"),
        ("{{filters}}\n a int DEFAULT 1\n", "unknown marker {{filters}}"),
        ("SELECT {{filter_values}}", "outside a file with a filter block"),
    ],
)
def test_malformed_templates_are_refused(text: str, message: str) -> None:
    with pytest.raises(TemplateError, match=message):
        expand(text)


def test_shipped_files_expand_completely() -> None:
    for path in sql_files():
        assert "{{" not in sql_text(path), path.name
    names = [p.name for p in selection_filters()]
    assert names[:3] == ["collections", "bbox", "intersects"] and len(names) == len(set(names))


def test_a_new_filter_is_one_line_and_its_condition(database_url: str) -> None:
    """Adding a filter to the SQL: one line in the block, its condition in matching_chips (the
    filtering under select_chips and the samples); every selection function then takes it by
    name and passes it on."""
    text = (resource_dir("sql") / SELECTION_SQL).read_text()
    line = "    min_fractions jsonb DEFAULT NULL\n"  # the block's last line
    where = "    FROM stacchip.chips AS c\n    WHERE "
    assert text.count(line) == 1 and text.count(where) == 1
    text = text.replace(line, "    min_fractions jsonb DEFAULT NULL,\n    max_x int DEFAULT NULL\n")
    text = text.replace(
        where,
        f"{where}(matching_chips.max_x IS NULL OR c.chip_index_x <= matching_chips.max_x)\n AND ",
    )
    with psycopg.connect(database_url, autocommit=True) as conn:
        fill_chips(conn, 3_000, collection="one")
        fill_chips(conn, 3_000, collection="two")
        conn.execute(expand(text))
        calls = [
            "stacchip.select_chips(max_x => 2)",
            "stacchip.sample_chips(40, 1, max_x => 2)",
            "stacchip.sample_chips_stratified(40, 1, max_x => 2)",
            "stacchip.sample_chips_stratified(40, 1, 'year', max_x => 2)",
            "stacchip.sample_chips_stratified(40, 1, 'cell', 0.1, max_x => 2)",
        ]
        for call in calls:
            xs = [row[0] for row in conn.execute(f"SELECT chip_index_x FROM {call}")]
            assert xs and max(xs) == 2, call
        (everywhere,) = conn.execute(
            "SELECT count(*) FROM pg_proc WHERE pronamespace = 'stacchip'::regnamespace "
            "AND 'max_x' = ANY (proargnames)"
        ).fetchone()
    assert everywhere == 5  # the four selection functions and matching_chips under them
