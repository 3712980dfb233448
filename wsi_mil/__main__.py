"""``python -m wsi_mil`` runs the command line."""

from .cli import main

main()
