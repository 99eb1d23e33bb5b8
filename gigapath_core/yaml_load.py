"""YAML loading with a budget: a config cannot make gigapath build or print an unbounded structure.

YAML anchors and aliases (``&a [...]`` / ``*a``) share one node, so a few hundred bytes can describe a
structure of billions of nodes (the "billion laughs" alias bomb): loading it is cheap, but validating,
fingerprinting (``json.dumps``) or printing it is not. :func:`load_yaml` composes the document with PyYAML's
``SafeLoader`` and counts the nodes the document would have with every alias expanded (memoised per shared
node, so counting costs one pass over the composed graph) before anything is constructed; a document over
:data:`MAX_NODES`, a recursive alias or a nesting deeper than :data:`MAX_DEPTH` is refused with a
:class:`~gigapath_core.errors.ConfigError`.

The same guard is common practice in YAML parsers of other ecosystems (e.g. the ``alias_ratio`` /
``max_alias_expansion`` limits of go-yaml's ``decode.go`` and of Rust's ``serde_yaml``); PyYAML has none.
"""

from __future__ import annotations

from typing import Any

import yaml

from .errors import ConfigError

#: nodes (scalars + sequences + mappings) a document may have with every alias expanded
MAX_NODES = 100_000
#: nesting depth of sequences/mappings
MAX_DEPTH = 64


class _BudgetLoader(yaml.SafeLoader):
    """``SafeLoader`` that checks the expanded size of the composed document before constructing it."""

    source = "<yaml>"

    def compose_document(self):
        node = super().compose_document()
        check_budget(node, self.source)
        return node


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for kv in node.value for n in kv]
    return []


def check_budget(root: yaml.Node, source: str = "<yaml>", max_nodes: int = MAX_NODES,
                 max_depth: int = MAX_DEPTH) -> int:
    """Expanded node count of a composed YAML graph (aliases counted once per use).

    Raises:
        ConfigError: more than ``max_nodes`` nodes once aliases are expanded, a recursive alias (a node that
            contains itself) or nesting deeper than ``max_depth``.
    """
    size: dict[int, int] = {}
    on_path: set[int] = set()
    # iterative post-order walk: (node, depth, children pushed?)
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 1, False)]
    while stack:
        node, depth, expanded = stack.pop()
        key = id(node)
        if expanded:
            on_path.discard(key)
            total = 1 + sum(size[id(c)] for c in _children(node))
            if total > max_nodes:
                _refuse(source, f"expands to more than {max_nodes:,} nodes through aliases (&anchor / *alias)")
            size[key] = total
            continue
        if key in size:
            continue
        if key in on_path:
            _refuse(source, "has a recursive alias (a node that contains itself)")
        if depth > max_depth:
            _refuse(source, f"nests deeper than {max_depth} levels")
        on_path.add(key)
        stack.append((node, depth, True))
        for child in _children(node):
            if id(child) in on_path:
                _refuse(source, "has a recursive alias (a node that contains itself)")
            if id(child) not in size:
                stack.append((child, depth + 1, False))
    return size[id(root)]


def _refuse(source: str, what: str) -> None:
    raise ConfigError("", f"{source}: refused: the YAML {what}; see docs/promises.md (limits)")


def yaml_error_message(source: str, err: yaml.YAMLError) -> str:
    """``"<source>:<line>:<col> is not valid YAML: <problem>"`` (1-based line and column of PyYAML's
    ``problem_mark``; the problem falls back to the ``context``, then to the message's first line)."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
    problem = getattr(err, "problem", None) or getattr(err, "context", None) or str(err).splitlines()[0]
    return f"{source}{where} is not valid YAML: {problem}"


def load_yaml(text: str, source: str = "<yaml>") -> Any:
    """``yaml.safe_load(text)`` within the budget above.

    Raises:
        ConfigError: over budget (see the module docstring), or not valid YAML (``source:line:col`` and the
            parser's problem, see ``yaml_error_message``).
    """
    loader = _BudgetLoader(text)
    loader.source = source
    try:
        return loader.get_single_data()
    except yaml.YAMLError as err:
        raise ConfigError("", yaml_error_message(source, err)) from None
    except RecursionError:  # PyYAML's composer recurses once per nesting level
        raise ConfigError("", f"{source}: refused: the YAML nests too deeply; see docs/promises.md (limits)") from None
    finally:
        loader.dispose()
