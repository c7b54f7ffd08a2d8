"""Allow `python -m pgproxy`."""

from pgproxy.cli.app import main

main()
