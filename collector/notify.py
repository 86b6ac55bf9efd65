"""Alarm notifications: a Slack-compatible webhook and, optionally, e-mail."""

from __future__ import annotations

import asyncio
import logging
import smtplib
from collections import Counter
from dataclasses import asdict, dataclass
from email.message import EmailMessage

import httpx

from cladnet.alarms import Event

log = logging.getLogger("cladnet.collector")


@dataclass
class SmtpSettings:
    host: str
    port: int = 25
    sender: str = "cladnet@localhost"
    to: tuple[str, ...] = ()
    username: str | None = None
    password: str | None = None
    starttls: bool = False


class Notifier:
    """Sends each alarm transition once; failures are logged and counted, never raised."""

    def __init__(self, webhook: str | None = None, smtp: SmtpSettings | None = None) -> None:
        self.webhook, self.smtp = webhook, smtp
        self.counters: Counter[str] = Counter()
        self._http = httpx.AsyncClient(timeout=10.0)
        self.history: list[dict[str, object]] = []  # recent transitions, for the API

    async def send(self, events: list[Event]) -> None:
        for event in events:
            self.history.append(asdict(event))
        del self.history[:-1000]
        if self.webhook:
            for event in events:
                await self._post(event)
        if self.smtp and self.smtp.to:
            try:
                await asyncio.to_thread(self._mail, events)
                self.counters["smtp_sent"] += len(events)
            except (OSError, smtplib.SMTPException) as exc:
                self.counters["smtp_failed"] += len(events)
                log.warning("alarm e-mail failed", extra={"error": repr(exc)})

    async def _post(self, event: Event) -> None:
        # Slack's incoming-webhook body is {"text": …}; the structured event rides along.
        body = {"text": event.text(), "cladnet": asdict(event)}
        try:
            response = await self._http.post(self.webhook, json=body)  # type: ignore[arg-type]
            response.raise_for_status()
            self.counters["webhook_sent"] += 1
        except httpx.HTTPError as exc:
            self.counters["webhook_failed"] += 1
            log.warning("alarm webhook failed", extra={"error": repr(exc)})

    def _mail(self, events: list[Event]) -> None:
        assert self.smtp is not None
        msg = EmailMessage()
        msg["Subject"] = events[0].text() if len(events) == 1 else f"{len(events)} CLADNet alarms"
        msg["From"] = self.smtp.sender
        msg["To"] = ", ".join(self.smtp.to)
        msg.set_content("\n".join(e.text() for e in events))
        with smtplib.SMTP(self.smtp.host, self.smtp.port, timeout=10) as smtp:
            if self.smtp.starttls:
                smtp.starttls()
            if self.smtp.username:
                smtp.login(self.smtp.username, self.smtp.password or "")
            smtp.send_message(msg)

    async def close(self) -> None:
        await self._http.aclose()
