"""A job spec's YAML text as plain data: safe YAML only, strictly read.

Every error is a `JobSpecError` about the document as a whole (`spec: invalid YAML at
line 3, column 7: ...`).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import yaml

from coordinator.planning.spec_errors import ROOT, JobSpecError

# A job spec is a screenful of YAML; refusing huge texts keeps the parser's work bounded.
MAX_SPEC_CHARS = 100_000


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping.

    PyYAML silently keeps the last of duplicate keys, so `steps: 10` followed later by
    `steps: 10000` would train for 10000 steps without a word.
    """

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


def read_spec_yaml(text: str) -> object:
    """The plain data of a job spec's YAML text; safe YAML only (no tags that build objects)."""
    if len(text) > MAX_SPEC_CHARS:
        raise JobSpecError(
            f"{ROOT}: is {len(text)} characters long; a job spec may have {MAX_SPEC_CHARS}"
        )
    try:
        # _StrictLoader is a SafeLoader: plain data only, no tag builds an object.
        doc = yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise JobSpecError(f"{ROOT}: invalid YAML{where}: {e.problem or e}") from None
    except yaml.YAMLError as e:
        raise JobSpecError(f"{ROOT}: invalid YAML: {e}") from None
    except RecursionError:
        raise JobSpecError(f"{ROOT}: invalid YAML: nested too deeply") from None
    except ValueError as e:
        # PyYAML converts scalars with int()/float(), which refuse e.g. 5000-digit numbers.
        raise JobSpecError(f"{ROOT}: invalid YAML: {e}") from None
    if doc is None:
        raise JobSpecError(f"{ROOT}: the document is empty")
    return doc
