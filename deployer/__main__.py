"""`python -m deployer` is the `rackserve` command."""

from deployer.cli.app import main

main()
