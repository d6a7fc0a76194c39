"""Memory units: everything rackserve counts is in bytes; these turn MiB and GiB into bytes."""

MIB = 1024**2
GIB = 1024**3
