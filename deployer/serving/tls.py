"""TLS for the endpoint: the certificate and key that Serve's HTTP proxies serve HTTPS with.

Ray Serve 2.60's `HTTPOptions` takes `ssl_certfile` and `ssl_keyfile` and hands them to
uvicorn. Serve reads them in each proxy, on its own node, when the proxy starts: with the
endpoint on every node (`--http-host 0.0.0.0`), every Ray node needs the files at the same
path (the `deploy_models` role copies them there). `load_tls` checks them here first, with the
standard library's own loader, so a missing file, a key that does not match the certificate
or a file that is not PEM is refused before anything changes.
"""

from __future__ import annotations

import dataclasses
import ssl
from pathlib import Path

from deployer.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    """A PEM certificate (chain) and its private key, by absolute path."""

    certfile: Path
    keyfile: Path


def load_tls(certfile: Path | None, keyfile: Path | None) -> TlsFiles | None:
    """The TLS files of a deploy, checked (both or neither); None: plain HTTP."""
    if certfile is None and keyfile is None:
        return None
    if certfile is None or keyfile is None:
        given, missing = ("--ssl-certfile", "--ssl-keyfile")[:: 1 if certfile else -1]
        raise ConfigError(f"{given} needs {missing} too: HTTPS takes a certificate and its key")
    for path in (certfile, keyfile):
        if not path.is_file():
            raise ConfigError(f"TLS file {path} does not exist or is not a file")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"TLS files {certfile} and {keyfile} do not load ({exc.strerror or exc}): give a PEM "
            "certificate and the unencrypted PEM key that matches it"
        ) from None
    return TlsFiles(certfile.absolute(), keyfile.absolute())
