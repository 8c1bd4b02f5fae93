"""`stacchip-db demo`: the whole offline demo, on an embedded database of its own."""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path

import click

from stacchip_db.cli.options import CliContext, pass_cli


@click.command()
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("stacchip-demo"),
    show_default=True,
    help="Folder for everything the demo makes: its database (OUT/home), scenes, cubes, pictures.",
)
@pass_cli
def demo(cli: CliContext, out_dir: Path) -> None:
    """Run the main job offline: serve a small STAC catalog on 127.0.0.1, ingest Sentinel-2 and
    NAIP scenes from it, then sample, export, describe and picture the chips.

    The demo never touches your database: it starts an embedded database of its own under
    OUT/home, whatever --database-url, STACCHIP_DATABASE_URL or STACCHIP_HOME say, and leaves it
    running so that you can query it (as root, when the server user cannot enter OUT, its home
    is a folder of its own under /var/lib/stacchip-db-demo). Needs
    `pip install 'stacchip-db[demo]'`.
    """
    from stacchip_db.demo import run_demo

    if not cli.settings.embedded:
        click.echo("demo: a database URL is set; the demo does not use it (its own is under OUT)")
    result = run_demo(out_dir)
    home = result.home
    sdb = _command()
    made = [result.out_dir] if home.is_relative_to(result.out_dir) else [result.out_dir, home]
    folders = " ".join(shlex.quote(str(folder)) for folder in made)
    click.echo(
        "\ndemo: done. What it made:\n"
        f"  copied scenes     {result.target}/{{collection}}/{{item_id}}/\n"
        f"  sample            {result.sample}\n"
        f"  npz cubes         {result.cubes}/sentinel-2-l2a/cube_*.npz (+ manifest)\n"
        f"  band statistics   {result.band_stats}\n"
        f"  pictures          {result.preview}, {result.map}\n"
        f"  database          embedded, under {home}, still running:\n"
        f"      export STACCHIP_HOME={shlex.quote(str(home))}\n"
        f'      psql "$({sdb} db url)"     # query it\n'
        f"      {sdb} db stop              # stop it when you are done\n"
        f"  remove everything: {sdb} db stop, then rm -r {folders}"
    )


def _command() -> str:
    """How to type this tool in the user's shell: `stacchip-db` when PATH finds this install,
    else the script's full path (a virtualenv that is not activated, as after `make demo`)."""
    script = Path(sys.executable).parent / "stacchip-db"
    found = shutil.which("stacchip-db")
    if script.exists() and (found is None or Path(found).resolve() != script.resolve()):
        return shlex.quote(str(script))
    return "stacchip-db"
