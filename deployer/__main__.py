"""`python -m deployer` is the `rackserve` command."""

from deployer.cli import main

main()
