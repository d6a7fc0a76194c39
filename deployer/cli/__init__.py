"""The `rackserve` command line and its tables."""
