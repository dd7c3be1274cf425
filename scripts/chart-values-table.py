#!/usr/bin/env python3
"""Prints the Markdown values table of charts/switchyard/README.md from values.yaml's `# --` comments.

A `# -- text` comment documents the key on the next line; its default is that key's value (a mapping
documented this way is one row). Keys without a comment of their own are containers of documented keys.
"""
import json
import re
import sys
from pathlib import Path

import yaml

VALUES = Path(__file__).resolve().parents[1] / "charts" / "switchyard" / "values.yaml"


def rows(path=VALUES):
    values = yaml.safe_load(path.read_text())
    stack, pending = [], None
    for line in path.read_text().splitlines():
        comment = re.match(r"^(\s*)# -- (.*)$", line)
        if comment:
            pending = comment.group(2)
            continue
        key = re.match(r"^(\s*)([A-Za-z][\w]*):", line)
        if not key:
            continue
        depth = len(key.group(1)) // 2
        stack = stack[:depth] + [key.group(2)]
        if pending is None:
            continue
        value = values
        for part in stack:
            value = value[part]
        yield ".".join(stack), value, pending
        pending = None


def main():
    out = ["| key | default | description |", "| --- | --- | --- |"]
    for key, default, text in rows():
        shown = json.dumps(default, ensure_ascii=False)
        out.append(f"| `{key}` | `{shown}` | {text} |")
    sys.stdout.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
