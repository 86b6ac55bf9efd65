"""The one typed client of the CLADNet APIs, used by the CLI (sync) and the agent (async).

Endpoints and their request/answer shapes live in :mod:`.endpoints`; both transports
raise :class:`ApiClientError` (status, code, message) for the shared error shape. Only
httpx is needed: nothing here imports the CLI's typer/rich.
"""

from cladnet.api_client.aio import PEER_PAGE, AsyncClient, fetch_pinned_ca
from cladnet.api_client.errors import ApiClientError, GaveUp, TrustError, WatchGone, retry_after
from cladnet.api_client.retry import NETWORK_ERRORS, TRANSIENT_STATUS, is_transient, with_retries
from cladnet.api_client.sync import SyncClient, fetch_ca

__all__ = [
    "NETWORK_ERRORS",
    "PEER_PAGE",
    "TRANSIENT_STATUS",
    "ApiClientError",
    "AsyncClient",
    "GaveUp",
    "SyncClient",
    "TrustError",
    "WatchGone",
    "fetch_ca",
    "fetch_pinned_ca",
    "is_transient",
    "retry_after",
    "with_retries",
]
