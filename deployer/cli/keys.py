"""`rackserve keys add|list|revoke`: the endpoint's API keys, in the key file on the head.

A key is shown once, when it is made; the file keeps only its SHA-256 digest. The endpoint
rereads the file when it changes, so a new or revoked key counts from the next request on,
with no restart.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from deployer.config.api_keys import new_secret
from deployer.serving.key_file import DEFAULT_KEY_FILE, change_keys, read_keys

keys_app = typer.Typer(
    name="keys",
    help="API keys of the endpoint: add, list, revoke (the key file on the head).",
    no_args_is_help=True,
)
console = Console(width=None if sys.stdout.isatty() else 132)

KeyFileOption = Annotated[
    Path,
    typer.Option(
        "--key-file", help="The key file (on the head: the ingress reads it).", dir_okay=False
    ),
]
NameArgument = Annotated[
    str, typer.Argument(help="The key's name (labels its metrics): letters, digits, '._@-'.")
]


@keys_app.command("add")
def add(
    name: NameArgument,
    models: Annotated[
        str,
        typer.Option(
            "--models", help="Comma-separated model ids the key may use, or '*' for every model."
        ),
    ],
    key_file: KeyFileOption = DEFAULT_KEY_FILE,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the new key as JSON {name, key, models}.")
    ] = False,
) -> None:
    """Make a key and print it, once: only its digest is kept."""
    secret = new_secret()
    created = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    ring = change_keys(key_file, lambda ring: ring.add(name, secret, models.split(","), created))
    allowed = next(k.models for k in ring.keys if k.name == name)
    if json_out:
        print(json.dumps({"name": name, "key": secret, "models": list(allowed)}))
        return
    print(secret)
    print(
        f"key {name!r} may use {', '.join(allowed)}; it is shown only now (the file keeps its "
        "digest). Send it as `Authorization: Bearer KEY`.",
        file=sys.stderr,
    )


@keys_app.command("list")
def list_keys(key_file: KeyFileOption = DEFAULT_KEY_FILE) -> None:
    """The keys by name, with the models each may use and when it was made."""
    ring = read_keys(key_file) if key_file.exists() else None
    table = Table("name", "models", "created", title=f"API keys in {key_file}")
    for key in ring.keys if ring else ():
        table.add_row(Text(key.name), Text(", ".join(key.models)), Text(key.created))
    console.print(table)


@keys_app.command("revoke")
def revoke(name: NameArgument, key_file: KeyFileOption = DEFAULT_KEY_FILE) -> None:
    """Remove a key: the endpoint refuses it from the next request on."""
    ring = change_keys(key_file, lambda ring: ring.revoke(name))
    print(f"key {name!r} revoked; {len(ring.keys)} key(s) left")
