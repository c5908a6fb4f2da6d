"""`python -m adaptgate_client.cli`."""

from adaptgate_client.cli import main

main()
