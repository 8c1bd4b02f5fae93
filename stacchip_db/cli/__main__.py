"""`python -m stacchip_db.cli`: the same as the `stacchip-db` command."""

from stacchip_db.cli import main

main(prog_name="stacchip-db")
