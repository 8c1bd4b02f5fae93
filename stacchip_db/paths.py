"""Names that become path segments: collection ids, item ids, asset keys, file names.

Ids come from STAC items and remote STAC APIs, so they are input, not trusted: joined into a
path as they are, `../../x` or `/etc/cron.d` would put files outside the directory (or S3
prefix) they were meant for. Every path stacchip-db builds from an id goes through
`check_name` first (ingest's target folders and copied files, prechip's cubes and manifests,
export-index's files, and the items `index` stores): the name must be ONE segment under its
root, nothing else is allowed to decide that.

Light on purpose (no boto3, no numpy): the store checks ids of every item it writes.
"""

from __future__ import annotations

from stacchip_db.errors import StacchipError

_FORBIDDEN = ("/", "\\", "\0")
# "/" and "\\" separate segments (on POSIX, S3 consoles and Windows); NUL ends a C path.


class UnsafeName(StacchipError):
    """An id or file name cannot be used as one path segment under its root."""


def check_name(name: object, what: str) -> str:
    """`name` when it is safe as one file or folder name under a root; else `UnsafeName`.

    Refused: a non-string or empty name, `.` and `..`, and names containing `/`, `\\`, a NUL
    or another control character (a newline in a file name breaks every listing). `what`
    says what the name is ("collection", "item id", "asset file name") for the message.
    """
    if not isinstance(name, str) or not name:
        raise UnsafeName(f"{what} {name!r} is empty or not text; it cannot name a folder or file")
    if name in (".", ".."):
        raise UnsafeName(f"{what} {name!r} would leave its folder; rename it")
    bad = [c for c in _FORBIDDEN if c in name] or [c for c in name if not c.isprintable()]
    if bad:
        raise UnsafeName(
            f"{what} {name!r} contains {bad[0]!r}, so it cannot be one folder or file name "
            "(it could write outside the output); rename it"
        )
    return name


def is_safe_name(name: object) -> bool:
    """Whether `check_name` accepts `name` (for callers that skip instead of failing)."""
    try:
        check_name(name, "name")
    except UnsafeName:
        return False
    return True
