"""The marked block an agent keeps in /etc/hosts where systemd-resolved does not run.

Pure text in, text out: every line outside ``# BEGIN cladnet <network>`` …
``# END cladnet <network>`` is kept byte for byte, so other tools' entries survive.
"""

from __future__ import annotations


def markers(network: str) -> tuple[str, str]:
    """The begin and end lines of ``network``'s block."""
    return f"# BEGIN cladnet {network}", f"# END cladnet {network}"


def render(network: str, names: dict[str, str]) -> str:
    """The block for ``names`` (fully qualified name → IP), empty when there are none."""
    if not names:
        return ""
    begin, end = markers(network)
    lines = [begin, "# written by cladnet-agent; edits inside this block are lost"]
    lines += [f"{ip}\t{name}" for name, ip in sorted(names.items())]
    return "\n".join([*lines, end]) + "\n"


def replace_block(text: str, network: str, block: str) -> str:
    """``text`` with ``network``'s block replaced by ``block`` ("" removes it).

    A block is put where the old one was, else appended. A begin marker without its
    end (someone edited the file) is dropped alone: the lines after it are kept.
    """
    begin, end = markers(network)
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    placed = False
    i = 0
    while i < len(lines):
        if lines[i].rstrip("\r\n") == begin:
            j = i + 1
            while j < len(lines) and lines[j].rstrip("\r\n") != end:
                j += 1
            if j == len(lines):  # no end marker: keep what follows, drop just the marker
                i += 1
                continue
            if not placed:
                out.append(block)
                placed = True
            i = j + 1
            continue
        out.append(lines[i])
        i += 1
    if not placed and block:
        if out and not out[-1].endswith("\n"):
            out.append("\n")
        out.append(block)
    return "".join(out)
