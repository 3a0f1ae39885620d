"""The one YAML reader for every file ditpipe reads (configs, a checkpoint's config.yaml, command-line values).

YAML aliases (`*name`) and anchors (`&name`) are refused while the document is composed, before any value exists:
an alias is a shared reference, so nine lines of them (a "billion laughs") name 9⁹ strings, which any copy, JSON
round trip or validation of the tree expands to gigabytes. ditpipe writes its configs without them
(`yaml.safe_dump` of plain data), so only a hand-written file can hold one; writing the value out in full is the fix.
"""

from __future__ import annotations

import yaml
from yaml.events import AliasEvent
from yaml.nodes import ScalarNode


class AliasRefused(yaml.composer.ComposerError, ValueError):
    """An alias or anchor. A YAMLError, as every other unreadable YAML is, and a ValueError for the readers that
    treat a damaged value as a damaged file."""

    def __str__(self) -> str:  # one line: the key, what to do, and where
        mark = self.problem_mark
        return f"{self.problem} (line {mark.line + 1}, column {mark.column + 1})"


class NoAliasLoader(yaml.SafeLoader):
    """yaml.SafeLoader without aliases or anchors; the error names the key (`validation.prompts`) and the line."""

    def __init__(self, stream):
        super().__init__(stream)
        self._keys: list = []  # the path to the node being composed: key nodes (mappings) and indices (sequences)

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, AliasEvent) or getattr(event, "anchor", None) is not None:
            what = f"alias *{event.anchor}" if isinstance(event, AliasEvent) else f"anchor &{event.anchor}"
            raise AliasRefused(None, None, f"{self._path(index)}: YAML {what} is not accepted (aliases can expand "
                                           "to gigabytes); write the value out in full", event.start_mark)
        self._keys.append(index)
        try:
            return super().compose_node(parent, index)
        finally:
            self._keys.pop()

    def _path(self, index) -> str:
        parts = []
        for k in [*self._keys, index]:
            if isinstance(k, ScalarNode):
                parts.append(str(k.value))
            elif isinstance(k, int) and not isinstance(k, bool):
                parts.append(f"[{k}]")
        return ".".join(parts).replace(".[", "[") or "the document"


def safe_load(text):
    """`yaml.safe_load` without aliases or anchors (AliasRefused)."""
    loader = NoAliasLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
