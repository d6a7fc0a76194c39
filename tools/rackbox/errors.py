"""The harness's exceptions."""

from __future__ import annotations


class RackError(RuntimeError):
    """Something the rack-in-a-box could not do; the message says what and where to look."""


class RackUnavailable(RackError):  # noqa: N818 - reads as a state: "the rack is unavailable"
    """This machine cannot run the rack-in-a-box (not root, no cgroup v2, nspawn cannot boot)."""


class RackBootError(RackError):
    """The hosts started but did not come up (no SSH before the timeout)."""
