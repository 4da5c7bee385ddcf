"""`python -m edgefleet.controller.cli`: the same entry point as the `edgefleet` console script."""

from edgefleet.controller.cli.main import main

main()
