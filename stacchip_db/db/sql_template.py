"""The `sql/` files as templates: the selection filters, written once, expanded by `db init`.

Every selection function (`select_chips`, `sample_chips`, `sample_chips_stratified` and its
PL/pgSQL worker) takes every filter as a named parameter, so that README's calls
(`stacchip.select_chips(bbox => …, start_time => …)`) work in psql; the wrappers pass them on.
PostgreSQL cannot declare a parameter list once for several functions, and a composite filter
type would not help: the functions would still have to declare each parameter to be called by
name, and would then repeat them all again to build the composite. So `sql/010_selection.sql`
declares the filters once, in a block, and says where they go with markers that `expand`
replaces before the file runs (`db/migrate.py`); `selection.py` reads the filters' names and
types from the same block (`selection_filters`).

The syntax, all of it (anything else between double braces is an error):

    {{filters}}                            the block, once: `name type DEFAULT value` per line
        collections text[] DEFAULT NULL,   (a trailing comma and `--` comments are allowed);
        …                                  it expands to nothing
    {{end filters}}
    {{filter_parameters}}                  the declarations, as written in the block
    {{filter_arguments select_chips.}}     `collections => select_chips.collections, …`
    {{filter_arguments $5}}                `collections => $5, bbox => $6, …`
    {{filter_values}}                      `collections, bbox, …`

A marker alone on its line expands to one item per line at its indentation (what `\\sf` shows),
otherwise to one line. A file without a block of its own (`sql/030`, `sql/040`) is expanded
with the shipped `sql/010`'s filters (`expand(…, shipped_filters=True)`, as `db init` does).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from stacchip_db.resources import resource_dir

SELECTION_SQL = "010_selection.sql"
"""The file whose filter block `selection_filters` reads."""

_BLOCK = re.compile(
    r"^[ \t]*\{\{filters\}\}[ \t]*\n(?P<body>.*?)^[ \t]*\{\{end filters\}\}[ \t]*\n",
    re.DOTALL | re.MULTILINE,
)
_MARKER = re.compile(r"\{\{\s*(?P<name>[a-z_]+)(?:[ \t]+(?P<argument>[^{}\s]+))?\s*\}\}")
_DECLARATION = re.compile(
    r"(?P<name>[a-z_][a-z0-9_]*)\s+(?P<type>.+?)\s+DEFAULT\s+(?P<default>.+?)", re.IGNORECASE
)


class TemplateError(ValueError):
    """A `sql/` file's markers or filter block are malformed (a bug of the shipped files)."""


@dataclass(frozen=True)
class Parameter:
    """One filter parameter: its SQL name, type (as written) and default."""

    name: str
    type: str
    default: str

    @property
    def declaration(self) -> str:
        return f"{self.name} {self.type} DEFAULT {self.default}"


def parse_filters(text: str) -> tuple[Parameter, ...]:
    """The filter block of a `sql/` file, in order; () when the file has none."""
    blocks = list(_BLOCK.finditer(text))
    if not blocks:
        return ()
    if len(blocks) > 1:
        raise TemplateError("the filter block is written more than once")
    parameters = []
    for line in blocks[0]["body"].splitlines():
        line = line.split("--", 1)[0].strip().removesuffix(",").strip()
        if not line:
            continue
        # Every filter has a default: any subset of them can be given by name.
        match = _DECLARATION.fullmatch(line)
        if match is None:
            raise TemplateError(f"filter {line!r} is not `name type DEFAULT value`")
        parameters.append(Parameter(match["name"], match["type"], match["default"]))
    names = [p.name for p in parameters]
    if len(set(names)) != len(names):
        raise TemplateError(f"a filter is declared twice in {', '.join(names)}")
    return tuple(parameters)


def expand(text: str, *, shipped_filters: bool = False) -> str:
    """`text` with its filter block removed and every marker replaced (see the module doc).

    `shipped_filters`: a file without a block of its own (`sql/030`'s layer sampler) takes
    the filters of the shipped `sql/010` (`selection_filters`).
    """
    filters = parse_filters(text)
    if not filters and shipped_filters:
        filters = selection_filters()
    text = _BLOCK.sub("", text)

    def replace(match: re.Match[str]) -> str:
        name, argument = match["name"], match["argument"]
        if name not in ("filter_parameters", "filter_values", "filter_arguments"):
            raise TemplateError(f"unknown marker {match[0]}")
        if not filters:
            raise TemplateError(f"{match[0]} outside a file with a filter block")
        if name == "filter_parameters" and argument is None:
            items = [p.declaration for p in filters]
        elif name == "filter_values" and argument is None:
            items = [p.name for p in filters]
        elif name == "filter_arguments" and argument is not None:
            if argument.startswith("$") and argument[1:].isdigit():
                first = int(argument[1:])
                items = [f"{p.name} => ${first + i}" for i, p in enumerate(filters)]
            elif argument.endswith("."):
                items = [f"{p.name} => {argument}{p.name}" for p in filters]
            else:
                raise TemplateError(f"{match[0]}: give a function name and a dot, or $N")
        else:
            raise TemplateError(f"{match[0]}: filter_arguments takes one argument, the others none")
        line_start = text.rfind("\n", 0, match.start()) + 1
        indent = text[line_start : match.start()]
        if indent.strip():
            return ", ".join(items)
        return f",\n{indent}".join(items)

    expanded = _MARKER.sub(replace, text)
    if "{{" in expanded:
        where = expanded.index("{{")
        raise TemplateError(f"a malformed marker is left: {expanded[where : where + 40]!r}")
    return expanded


@functools.cache
def selection_filters() -> tuple[Parameter, ...]:
    """The filter parameters of the selection functions, from the shipped `sql/010` file."""
    filters = parse_filters((resource_dir("sql") / SELECTION_SQL).read_text())
    if not filters:
        raise TemplateError(f"{SELECTION_SQL} has no filter block")
    return filters
