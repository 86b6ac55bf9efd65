"""The shell blocks of the docs, for tests that run them as a reader would."""

from __future__ import annotations

import re
from pathlib import Path


def sh_blocks(markdown: Path, section: str) -> list[str]:
    """The ```sh blocks of ``section`` (a ``## `` heading, matched by its start) in order."""
    text = markdown.read_text()
    match = re.search(rf"(?m)^## {re.escape(section)}.*$", text)
    if match is None:
        raise AssertionError(f"{markdown.name} has no section '## {section}'")
    end = text.find("\n## ", match.end())
    body = text[match.end() : end if end != -1 else len(text)]
    return re.findall(r"```sh\n(.*?)```", body, flags=re.S)
