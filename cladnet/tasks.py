"""Stopping background tasks, the one way every service does it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any


async def cancel_and_wait(
    tasks: Iterable[asyncio.Task[Any] | None], *ignore: type[BaseException]
) -> None:
    """Cancel the tasks (``None`` entries are skipped) and wait until each has ended.

    Their cancellation is swallowed, and so are the ``ignore`` exceptions: what a
    task was failing with as it stopped (a broken broker connection, say) is no
    longer anyone's concern.
    """
    running = [t for t in tasks if t is not None]
    for t in running:
        t.cancel()
    for t in running:
        with contextlib.suppress(asyncio.CancelledError, *ignore):
            await t
