"""``python -m wsi_mil`` runs the command line."""

from wsi_mil.cli import main

main()
