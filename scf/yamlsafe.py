"""The one YAML loader of the project: safe tags only, and bounded in what a document may expand to.

YAML anchors and aliases (``&a [...]`` / ``*a``) let a few hundred bytes describe billions of values
(the "billion laughs" document). Loading one is cheap, because PyYAML shares aliased objects, but
anything that walks the result (validation, an error message quoting it) expands it and never
finishes. `load_yaml` composes the document's node graph, counts the values it expands to with
memoisation (each node is counted once, so the count costs the size of the text, not of the
expansion), and refuses a document over `MAX_VALUES` before constructing anything. Ordinary anchors,
such as a shared block of settings, keep working.

Used by ``scf merge --set`` and ``--config`` (scf/cli.py, scf/spec.py) and by the pipeline config
(tasks/config.py).
"""

from __future__ import annotations

from typing import Any

import yaml

from scf.errors import ScfError

# Far above any real config (a pipeline sweep or a mergekit-style slice list is a few thousand values).
MAX_VALUES = 100_000
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_yaml(text: str, origin: str, *, max_values: int = MAX_VALUES) -> Any:
    """Parse YAML with safe tags only, refusing a document that expands to more than ``max_values``.

    Args:
        text: the YAML text.
        origin: where it came from, for messages (a file name, ``--set alpha``).
        max_values: the most scalars, sequences and mappings the document may hold once every
            alias is expanded.

    Returns:
        The parsed value (None for an empty document).

    Raises:
        ScfError: not YAML, a tag other than the standard ones (``!!python/...``), a recursive
            alias, or too many values; the message names ``origin`` and is one line.
    """
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        expanded_size(node, max_values, origin)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ScfError(f"{origin}: invalid YAML ({exc})") from None
    except RecursionError:
        raise ScfError(f"{origin}: YAML nested too deeply") from None
    finally:
        loader.dispose()


def expanded_size(root: yaml.Node, limit: int, origin: str) -> int:
    """The number of values (scalars, sequences, mappings) ``root`` stands for with aliases expanded.

    Walks the node graph depth first without recursion; a node reached again through an alias adds
    its memoised size instead of being walked again.

    Args:
        root: a composed YAML node.
        limit: stop and raise as soon as the count passes this.
        origin: for the message.

    Returns:
        The count (at most ``limit``).

    Raises:
        ScfError: the count passes ``limit``, or an alias refers to a node that contains it.
    """
    done: dict[int, int] = {}  # id(node) -> expanded size
    partial = {id(root): 1}  # nodes on the current path -> size counted so far
    stack = [(root, iter(_children(root)))]
    while stack:
        node, children = stack[-1]
        child = next(children, None)
        if child is None:
            stack.pop()
            done[id(node)] = size = partial.pop(id(node))
            if stack:
                _add(partial, id(stack[-1][0]), size, limit, origin)
            continue
        if id(child) in done:
            _add(partial, id(node), done[id(child)], limit, origin)
        elif id(child) in partial:
            raise ScfError(f"{origin}: a YAML alias refers to a value that contains it (recursive alias)")
        else:
            partial[id(child)] = 1
            stack.append((child, iter(_children(child))))
    return done[id(root)]


def _add(partial: dict[int, int], key: int, size: int, limit: int, origin: str) -> None:
    partial[key] += size
    if partial[key] > limit:
        raise ScfError(f"{origin}: the YAML expands to more than {limit:,} values through anchors and "
                       f"aliases (&name / *name); refusing it (a 'billion laughs' document?)")


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []
