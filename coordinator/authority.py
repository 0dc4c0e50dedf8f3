"""The coordinator's certificate authority (`proto.certificates`), kept in its store.

Made on a first start and stored beside the coordinator key, so a coordinator restarted
on the same store (another machine, with Redis) is the same authority: workers that pinned
its fingerprint and certificates it signed stay valid. Whoever can read the store can
already act as the coordinator (its key is there too), so the authority's key adds no
new trust. Its certificate alone (public) is written to a file for local clients.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from coordinator.store import StateStore
from proto.certificates import CertificateAuthority

AUTHORITY_BLOB = "tls-authority"
CERTIFICATE_FILE = "ca.pem"


async def load_authority(store: StateStore) -> CertificateAuthority:
    """The authority in the store, created and stored on a first start (CertificateError
    for a stored one that cannot be read)."""
    blob = await asyncio.to_thread(store.get_blob, AUTHORITY_BLOB)
    if blob:
        return CertificateAuthority.from_blob(blob, where=f"the store's {AUTHORITY_BLOB!r}")
    ca = CertificateAuthority.create()
    await asyncio.to_thread(store.put_blob, AUTHORITY_BLOB, ca.blob)
    return ca


def write_certificate(ca: CertificateAuthority, path: Path) -> None:
    """The authority's certificate at `path` (replaced whole, never half written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(ca.cert_pem)
    os.replace(tmp, path)
