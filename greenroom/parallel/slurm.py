"""Slurm's compressed host lists: ``gpu-[01-03,07],login1`` -> gpu-01, gpu-02, gpu-03, gpu-07,
login1 (ranges keep their zero padding; several bracket groups in one name multiply)."""

from __future__ import annotations

import re

_GROUP = re.compile(r"\[([^\]]*)\]")


class NodeListError(ValueError):
    pass


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise NodeListError(f"unbalanced ']' in node list {text!r}")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise NodeListError(f"unbalanced '[' in node list {text!r}")
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _expand_range(spec: str, text: str) -> list[str]:
    out = []
    for item in spec.split(","):
        item = item.strip()
        if "-" in item:
            lo, hi = item.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                raise NodeListError(f"bad range {item!r} in node list {text!r}")
            width = len(lo)
            out += [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
        elif item.isdigit():
            out.append(item)
        else:
            raise NodeListError(f"bad entry {item!r} in node list {text!r}")
    return out


def _expand_name(name: str, text: str) -> list[str]:
    found = _GROUP.search(name)
    if found is None:
        return [name]
    head, tail = name[: found.start()], name[found.end() :]
    return [
        expanded
        for part in _expand_range(found.group(1), text)
        for expanded in _expand_name(head + part + tail, text)
    ]


def expand_nodelist(text: str) -> list[str]:
    """Every host of a Slurm node list, in order."""
    hosts = [h for name in _split_top(text) for h in _expand_name(name, text)]
    if not hosts:
        raise NodeListError(f"node list {text!r} names no host")
    return hosts
