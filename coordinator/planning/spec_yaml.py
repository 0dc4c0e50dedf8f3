"""A job spec's YAML text as plain data: safe YAML only, strictly read, within bounds.

Every error is a `JobSpecError` about the document as a whole (`spec: invalid YAML at
line 3, column 7: ...`). The text's size, its nesting and its number of values are bounded
(`SpecLimits`), and anchors and aliases are refused outright, as they are met: an alias
repeats a value without repeating its text, so a few hundred bytes of them ("billion
laughs") stand for billions of values that every later pass over the data would walk.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import yaml

from coordinator.planning.spec_errors import ROOT, JobSpecError
from coordinator.planning.spec_limits import FLAGS, SpecLimits


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping, any anchor or alias,
    and a document nested or sized beyond its `limits`.

    PyYAML silently keeps the last of duplicate keys, so `steps: 10` followed later by
    `steps: 10000` would train for 10000 steps without a word.
    """

    def __init__(self, text: str, limits: SpecLimits) -> None:
        super().__init__(text)
        self.limits = limits
        self.nodes = 0
        self.depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        """Each value of the document as it is met: an anchor or alias is refused before
        PyYAML resolves it, and so are values past the bounds on nesting and count."""
        event = self.peek_event()
        where = f"{ROOT}: line {event.start_mark.line + 1}, column {event.start_mark.column + 1}"
        if isinstance(event, yaml.AliasEvent):
            raise JobSpecError(
                f"{where}: YAML alias *{event.anchor} is refused: a job spec writes every value "
                "out (no anchors, aliases or merge keys)"
            )
        if event.anchor is not None:
            raise JobSpecError(
                f"{where}: YAML anchor &{event.anchor} (and any alias *{event.anchor}) is "
                "refused: a job spec writes every value out (no anchors, aliases or merge keys)"
            )
        self.nodes += 1
        if self.nodes > self.limits.max_nodes:
            raise JobSpecError(
                f"{where}: the document holds more than {self.limits.max_nodes} values, the "
                f"most this coordinator reads ({FLAGS['max_nodes']})"
            )
        if self.depth >= self.limits.max_depth:
            raise JobSpecError(
                f"{where}: values are nested more than {self.limits.max_depth} deep, the most "
                f"this coordinator reads ({FLAGS['max_depth']})"
            )
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue  # unhashable keys are refused by PyYAML; merge keys may repeat
            key = self.construct_object(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_spec_yaml(text: str, limits: SpecLimits | None = None) -> object:
    """The plain data of a job spec's YAML text; safe YAML only (no tags that build
    objects), no anchors or aliases, within `limits` (default: `SpecLimits()`)."""
    limits = limits or SpecLimits()
    size = len(text.encode("utf-8", errors="replace"))
    if size > limits.max_bytes:
        raise JobSpecError(
            f"{ROOT}: is {size} bytes long ({len(text)} characters); this coordinator reads "
            f"job specs of at most {limits.max_bytes} bytes ({FLAGS['max_bytes']})"
        )
    loader: _StrictLoader | None = None
    try:
        # _StrictLoader is a SafeLoader: plain data only, no tag builds an object. Its reader
        # checks the text's characters as it is made, so it is made inside the try.
        loader = _StrictLoader(text, limits)
        doc = loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise JobSpecError(f"{ROOT}: invalid YAML{where}: {e.problem or e}") from None
    except yaml.YAMLError as e:
        raise JobSpecError(f"{ROOT}: invalid YAML: {e}") from None
    except RecursionError:
        raise JobSpecError(f"{ROOT}: invalid YAML: nested too deeply") from None
    except JobSpecError:
        raise  # a bound or an alias, refused as the document was read
    except ValueError as e:
        # PyYAML converts scalars with int()/float(), which refuse e.g. 5000-digit numbers.
        raise JobSpecError(f"{ROOT}: invalid YAML: {e}") from None
    finally:
        if loader is not None:
            loader.dispose()
    if doc is None:
        raise JobSpecError(f"{ROOT}: the document is empty")
    return doc
