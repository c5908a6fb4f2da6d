"""`python -m adaptgate_client` runs the CLI."""

from adaptgate_client.cli import main

main()
