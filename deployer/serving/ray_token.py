"""Ray's token authentication for rackserve's own process: where the rack keeps the token.

The roles run every Ray unit with RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH (the token in a
file only the Ray user reads); a client must do the same, or the GCS and the dashboard refuse it.
No Ray import here: the mode must be set before Ray is imported, as Ray reads it once.
"""

from __future__ import annotations

import os

RAY_TOKEN_FILE = "/etc/rackserve/ray-token"
"""Where the roles keep Ray's token on every node (ray_common_auth_token_path's default)."""
RAY_AUTH_MODE_ENV = "RAY_AUTH_MODE"
RAY_TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"


def use_rack_token(token_file: str = RAY_TOKEN_FILE) -> bool:
    """Turn on Ray's token authentication for this process when the rack's token file is here.

    Only when RAY_AUTH_MODE is unset and `token_file` is readable, so that `rackserve` run by
    hand on a node of a rack with token authentication connects as the Ray units do; an
    explicit RAY_AUTH_MODE (the roles set it) always wins. True when token mode is on.
    """
    if RAY_AUTH_MODE_ENV in os.environ or not os.access(token_file, os.R_OK):
        return os.environ.get(RAY_AUTH_MODE_ENV) == "token"
    os.environ[RAY_AUTH_MODE_ENV] = "token"
    os.environ.setdefault(RAY_TOKEN_PATH_ENV, token_file)
    return True
