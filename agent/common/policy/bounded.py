"""YAML and decoded documents held to the document limits (agent.common.policy.limits)
before anything is built from them: nesting, values with aliases expanded, documents
per file and digits in a number. Policy documents and configuration files both go
through here."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import yaml

from agent.common.policy.limits import MAX_DEPTH, MAX_DOCUMENTS, MAX_VALUES

# An integer in a policy is at most a rate in bits per second or a mark: 20 digits hold
# either; Python refuses to convert more than 4300.
_MAX_INT_CHARS = 32
_INT_TAG = "tag:yaml.org,2002:int"
# Field names a path shows before it is cut short.
_PATH_SHOWN = 8


class YamlLimitError(yaml.MarkedYAMLError):
    """A YAML document beyond a limit, found before it was built: where (`mark`, the
    field `path`) and why."""

    def __init__(self, path: str, reason: str, mark: yaml.Mark) -> None:
        super().__init__(problem=reason, problem_mark=mark)
        self.path = path
        self.reason = reason
        self.mark = mark


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing while it composes, before anything is built: nesting
    beyond MAX_DEPTH (the composer recurses once per level: 20,000 levels end in
    RecursionError), more than MAX_VALUES values with aliases expanded (parsing is what
    costs: a megabyte of values took 22 s to parse and then refuse), more than
    MAX_DOCUMENTS documents in the file, and integers too long to be a rate (Python
    refuses to build one of over 4300 digits)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._fields: list[int | str] = []
        self._values = 0
        self._documents = 0
        # The values under each anchored node, aliases expanded: what an alias adds.
        self._anchored: dict[int, int] = {}

    def compose_document(self) -> yaml.Node | None:
        self._documents += 1
        if self._documents > MAX_DOCUMENTS:
            mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
            raise YamlLimitError("", f"holds more than {MAX_DOCUMENTS} documents", mark)
        self._values, self._anchored = 0, {}
        return super().compose_document()

    def _count(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.AliasEvent):
            node = super().compose_node(parent, index)
            self._values += self._anchored.get(id(node), 1)
        else:
            before = self._values
            self._values += 1
            node = super().compose_node(parent, index)
            if getattr(event, "anchor", None) is not None:
                self._anchored[id(node)] = self._values - before
        if self._values > MAX_VALUES:
            raise YamlLimitError("", too_many_values(), event.start_mark)
        return node

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        # `index` is a sequence item's position, or a mapping value's key node.
        key: object = index
        if isinstance(key, int):
            self._fields.append(key)
        elif isinstance(key, yaml.ScalarNode):
            self._fields.append(str(key.value))
        else:
            self._fields.append("(key)" if parent is not None else "")
        try:
            if len(self._fields) > MAX_DEPTH:
                fields = [f for f in self._fields if f != ""]
                raise YamlLimitError(
                    shownfield_path(fields),
                    f"nested deeper than {MAX_DEPTH} levels",
                    self.peek_event().start_mark,  # type: ignore[no-untyped-call]
                )
            node = self._count(parent, index)
            if (
                isinstance(node, yaml.ScalarNode)
                and node.tag == _INT_TAG
                and len(node.value) > _MAX_INT_CHARS
            ):
                reason = f"a number of {len(node.value)} digits; at most {_MAX_INT_CHARS}"
                fields = [f for f in self._fields if f != ""]
                raise YamlLimitError(shownfield_path(fields), reason, node.start_mark)
            return node
        finally:
            self._fields.pop()


def load_yaml_documents(text: str) -> list[Any]:
    """The documents of YAML `text`, as PyYAML's safe loader builds them, within the
    limits on nesting, values and numbers; raises YamlLimitError beyond them, yaml.YAMLError for
    text that is not YAML."""
    return list(yaml.load_all(text, Loader=_BoundedLoader))


def shownfield_path(fields: Sequence[int | str]) -> str:
    shown = field_path(fields[:_PATH_SHOWN])
    return shown + "..." if len(fields) > _PATH_SHOWN else shown


def too_many_values() -> str:
    return f"holds more than {MAX_VALUES} values (a YAML alias counts as what it stands for)"


def shape_problem(document: object) -> tuple[str, str] | None:
    """(path, reason) where a document nests deeper than MAX_DEPTH or holds more than
    MAX_VALUES values, counting a YAML alias as what it expands to; None within both.
    Walks at most MAX_VALUES values, however large the expansion."""
    count = 1
    pending: list[tuple[object, tuple[int | str, ...]]] = [(document, ())]
    while pending:
        value, where = pending.pop()
        if len(where) >= MAX_DEPTH:
            return shownfield_path(where), f"nested deeper than {MAX_DEPTH} levels"
        children: Iterable[tuple[int | str, object]]
        if isinstance(value, Mapping):
            children = ((str(k), v) for k, v in value.items())
        elif isinstance(value, list | tuple):
            children = enumerate(value)
        else:
            continue
        # A mapping's keys count, as the YAML loader counts them.
        count += 2 * len(value) if isinstance(value, Mapping) else len(value)
        if count > MAX_VALUES:
            return "", too_many_values()
        pending.extend((child, (*where, key)) for key, child in children)
    return None


def field_path(loc: Iterable[int | str]) -> str:
    """A field's path as the messages write it: `spec.classes[0].rate`."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else part
    return path
