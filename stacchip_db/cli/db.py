"""`stacchip-db db …`: the embedded database's life cycle, migrations and a health report."""

from __future__ import annotations

import click

from stacchip_db.cli.options import CliContext, pass_cli
from stacchip_db.config import mask_url
from stacchip_db.db import connect, init_database, read_schema_state
from stacchip_db.db.embedded import EmbeddedCluster
from stacchip_db.errors import ConfigError, StacchipError


def _cluster(cli: CliContext, command: str) -> EmbeddedCluster:
    if not cli.settings.embedded:
        raise ConfigError(
            f"`db {command}` manages the embedded database, but a server URL is set "
            f"({mask_url(cli.settings.database_url or '')}); unset --database-url / "
            "STACCHIP_DATABASE_URL to use the embedded one"
        )
    return EmbeddedCluster(cli.settings.home)


@click.group()
def db() -> None:
    """Manage the database: embedded cluster, migrations, health."""


@db.command()
@pass_cli
def start(cli: CliContext) -> None:
    """Start the embedded database (creating it on first use)."""
    status, started = _cluster(cli, "start").start()
    state = "started" if started else "is already running"
    click.echo(f"the embedded database {state} ({status.where()})")


@db.command()
@pass_cli
def stop(cli: CliContext) -> None:
    """Stop the embedded database."""
    cluster = _cluster(cli, "stop")
    if cluster.stop():
        click.echo(f"stopped the embedded database (home {cluster.home})")
    else:
        click.echo(f"the embedded database was not running (home {cluster.home})")


@db.command()
@pass_cli
@click.pass_context
def status(ctx: click.Context, cli: CliContext) -> None:
    """Say whether the database runs. Exit 0 when it does, 3 when it is stopped."""
    if not cli.settings.embedded:
        url = cli.settings.database_url or ""
        with connect(url, autocommit=True) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]
        click.echo(f"server at {mask_url(url)}: reachable, PostgreSQL {version}")
        return
    current = EmbeddedCluster(cli.settings.home).status()
    click.echo(current.describe())
    if not current.running:
        ctx.exit(3)


@db.command()
@click.option("--tcp", is_flag=True, help="The loopback TCP URL instead of the unix socket's.")
@click.option(
    "--show-password", is_flag=True, help="Print the password instead of *** (TCP URL only)."
)
@pass_cli
def url(cli: CliContext, tcp: bool, show_password: bool) -> None:
    """Print the URL to hand to other tools (psql, QGIS, stac-fastapi-pgstac).

    Only answers: the embedded database must be running (`db start`); nothing is created.
    """
    if not cli.settings.embedded:
        server = cli.settings.database_url or ""
        click.echo(server if show_password else mask_url(server))
        return
    cluster = EmbeddedCluster(cli.settings.home)
    # A question, not a command: never create or start a cluster (a typo'd or unset
    # STACCHIP_HOME would otherwise quietly give a new, empty database).
    if not cluster.status().running:
        raise ConfigError(
            f"no embedded database is running under {cluster.home} (STACCHIP_HOME): start it "
            "with `stacchip-db db start`, or set STACCHIP_HOME to the home you meant"
        )
    click.echo(cluster.tcp_url(show_password=show_password) if tcp else cluster.socket_url())


@db.command()
@pass_cli
def init(cli: CliContext) -> None:
    """Create or upgrade everything stacchip-db needs in the database (idempotent)."""
    url = cli.database_url()
    state = init_database(url)
    click.echo(
        f"database ready at {mask_url(url)}: PostgreSQL {state.server_version}, "
        f"PostGIS {state.postgis_version}, pgstac {state.pgstac_version}, "
        f"schema stacchip at revision {state.alembic_revision}"
    )


@db.command()
@pass_cli
def doctor(cli: CliContext) -> None:
    """Print PostgreSQL, PostGIS, pgstac and schema versions, and what is wrong."""
    url = cli.database_url()
    with connect(url, autocommit=True) as conn:
        state = read_schema_state(conn)
    rows = [
        ("database", mask_url(url)),
        ("postgresql", state.server_version),
        ("postgis", state.postgis_version or "missing"),
        ("pgstac", state.pgstac_version or "missing"),
        ("schema stacchip", state.alembic_revision or "missing"),
        ("sql functions", state.sql_checksum or "missing"),
    ]
    for name, value in rows:
        click.echo(f"{name:<16} {value}")
    if state.current:
        click.echo("status           ok")
        return
    for problem in state.problems:
        click.echo(f"problem          {problem}")
    raise StacchipError(f"{len(state.problems)} problem(s) found: run `stacchip-db db init`")
