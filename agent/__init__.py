"""The CLADNet agent: one per host, owns the WireGuard device and pushes metrics."""

import sys

# httpx imports its command-line client (click, rich, pygments: 5.5 MiB resident)
# whenever those are installed, as they are next to the `cladnet` CLI; the agent never
# uses it. A None entry makes that import fail, which httpx handles.
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
