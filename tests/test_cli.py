"""The CLI's error boundary, exit codes and password masking."""

from __future__ import annotations

import logging
import socket

from stacchip_db.config import MaskPasswordsFilter, mask_url
from tests.conftest import error_line, run_cli


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_mask_url_forms() -> None:
    assert mask_url("postgresql://alice:s3cr%40t@db:5432/x") == "postgresql://alice:***@db:5432/x"
    assert mask_url("host=db password=s3cret user=a") == "host=db password=*** user=a"
    assert mask_url("host=db password='a b' user=a") == "host=db password=*** user=a"
    assert mask_url("postgresql://db/x?user=a&password=s3cret") == (
        "postgresql://db/x?user=a&password=***"
    )
    assert mask_url("postgresql://alice@db/x") == "postgresql://alice@db/x"
    assert mask_url("postgresql://alice@db:5432/x?sslmode=require") == (
        "postgresql://alice@db:5432/x?sslmode=require"
    )


def test_mask_url_awkward_passwords() -> None:
    # Raw characters libpq users do put in URLs, and every place a password can stand.
    secret = "p@ss:w/rd?x%40y"
    forms = {
        f"postgresql://alice:{secret}@db:5432/x": "postgresql://alice:***@db:5432/x",
        f"at postgresql://alice:{secret}@db/x: refused": "at postgresql://alice:***@db/x: refused",
        f"postgresql://alice@corp:{secret}@db/x": "postgresql://alice@corp:***@db/x",
        f"postgresql://alice:{secret}@[::1]:5432/x": "postgresql://alice:***@[::1]:5432/x",
        f"postgresql:///x?host=/tmp&password={secret}&user=a": (
            "postgresql:///x?host=/tmp&password=***&user=a"
        ),
        f"host=db password={secret} user=a": "host=db password=*** user=a",
        "host=db password = 'it\\'s p@ss' user=a": "host=db password = *** user=a",
        f"PGPASSWORD={secret} psql": "PGPASSWORD=*** psql",
    }
    for text, masked in forms.items():
        assert mask_url(text) == masked, text
        assert mask_url(masked) == masked  # masking twice changes nothing


def test_database_url_help_says_arguments_show_in_ps() -> None:
    result = run_cli(["--help"])
    assert result.exit_code == 0
    flat = " ".join(result.stdout.split())
    assert "prefer $STACCHIP_DATABASE_URL" in flat and "show in `ps`" in flat


def test_log_records_are_masked() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "using %s", ("postgresql://a:pw@h/d",),
                               None)
    MaskPasswordsFilter().filter(record)
    assert record.getMessage() == "using postgresql://a:***@h/d"


def test_unreachable_database_is_one_line_with_masked_password() -> None:
    url = f"postgresql://alice:hunter2@127.0.0.1:{_closed_port()}/stacchip"
    result = run_cli(["db", "doctor"], database_url=url)
    error = error_line(result)
    assert "cannot connect to the database at postgresql://alice:***@127.0.0.1" in error
    assert "Connection refused" in error  # libpq's reason, then its hint said once, not twice
    assert error.lower().count("is the server running") == 1, error
    assert "hunter2" not in result.output


def test_verbose_shows_the_traceback() -> None:
    url = f"postgresql://alice:hunter2@127.0.0.1:{_closed_port()}/stacchip"
    result = run_cli(["-v", "db", "doctor"], database_url=url)
    assert result.exit_code == 1
    assert "Traceback" in result.stderr
    assert "hunter2" not in result.stderr.split("Traceback")[0]


def test_malformed_url_is_one_line() -> None:
    error = error_line(run_cli(["db", "doctor"], database_url="postgresql://a:b@host:notaport/x"))
    assert "database" in error
    assert ":b@" not in error


def test_usage_error_exits_2() -> None:
    result = run_cli(["db", "no-such-command"])
    assert result.exit_code == 2
    assert "No such command" in result.stderr


def test_version_and_help() -> None:
    version = run_cli(["--version"])
    assert version.exit_code == 0 and "stacchip-db" in version.stdout
    help_text = run_cli(["db", "--help"])
    for command in ("start", "stop", "status", "url", "init", "doctor"):
        assert command in help_text.stdout
