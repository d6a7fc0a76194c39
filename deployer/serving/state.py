"""What rackserve deployed last, kept where every node's `rackserve` can read it.

The record (`deployer.planning.redeploy.Deployed`) lives in the Ray cluster's own key-value
store (the GCS), so it is lost only with the cluster, and with it everything it describes.
`StateStore` is the one interface the launcher uses; another store (a file, Redis) slots in
behind it.
"""

from __future__ import annotations

from typing import Protocol

from deployer.planning.redeploy import Deployed

KV_NAMESPACE = "rackserve"
KV_KEY = b"deployment"


class StateStore(Protocol):
    """Reads and replaces the deployed record."""

    def read(self) -> Deployed | None:
        """The record, or None when nothing is deployed."""

    def write(self, deployed: Deployed | None) -> None:
        """Replace the record; None forgets it."""


class RayKvStore:
    """The record in Ray's internal key-value store; needs a connected Ray driver."""

    def read(self) -> Deployed | None:
        """The record, or None when nothing is deployed."""
        from ray.experimental import internal_kv

        value = internal_kv._internal_kv_get(KV_KEY, namespace=KV_NAMESPACE)
        return Deployed.from_bytes(value if isinstance(value, bytes) else None)

    def write(self, deployed: Deployed | None) -> None:
        """Replace the record; None forgets it."""
        from ray.experimental import internal_kv

        if deployed is None:
            internal_kv._internal_kv_del(KV_KEY, namespace=KV_NAMESPACE)
        else:
            internal_kv._internal_kv_put(KV_KEY, deployed.to_bytes(), namespace=KV_NAMESPACE)
