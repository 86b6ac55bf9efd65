"""Installs by role: a program started from an install without its extra says so in one line."""

from __future__ import annotations

from typing import NoReturn


def missing_extra(program: str, extra: str, missing: ModuleNotFoundError) -> NoReturn:
    """Exit with one line naming the extra ``program`` needs (not an import traceback)."""
    raise SystemExit(
        f"{program}: this install lacks the '{extra}' extra ({missing.name} is not "
        f"installed): pip install 'cladnet[{extra}]'"
    ) from None
