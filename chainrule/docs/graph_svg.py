"""A model's computation graph as SVG, made from its equations: tensors and equations are the nodes,
an edge runs from each tensor an equation reads to the equation and from the equation to the tensor it
defines. Nothing is drawn by hand: a layered layout (each node one row below everything it depends on),
top to bottom, in plain SVG (no script, no external font), so it shows in any browser and from file://.
"""
from __future__ import annotations

from dataclasses import dataclass
from html import escape

from ..derive.graph import Model
from ..derive.tensor import shape_str
from .html import anchor

ROW, COL, PAD = 64, 150, 20          # pixels between rows, between columns, around the drawing
LEFT = 60                            # room on the left for edges that skip rows (residual connections)
NODE_W, NODE_H = 132, 34

_ROLE_CLASS = {"param": "param", "input": "input", "target": "input", "noise": "noise",
               "loss": "loss", "cost": "loss"}


@dataclass
class Node:
    key: str           # "t:NAME" for a tensor, "e:NAME" for the equation defining NAME
    label: str
    sub: str           # second line: a tensor's shape, an equation's layer
    kind: str          # css class
    href: str | None
    title: str
    row: int = 0
    col: int = 0


def graph_nodes(model: Model):
    """Nodes and edges of the forward graph, in the model's topological order."""
    nodes, edges = {}, []

    def tensor_node(name):
        if f"t:{name}" not in nodes:
            t = model.tensors[name]
            defined = model.equation_for(name) is not None
            nodes[f"t:{name}"] = Node(f"t:{name}", name, shape_str(t.shape), _ROLE_CLASS.get(t.role, "hidden"),
                                      f"#{anchor(name)}" if defined else None, f"{t.role} {name} {shape_str(t.shape)}")
        return f"t:{name}"

    order = {name: k for k, name in enumerate(model.tensors)}   # declaration order: the same drawing every run
    for eq in model.equations:
        key = f"e:{eq.out.name}"
        nodes[key] = Node(key, "=", _layer_label(eq.layer), "equation", f"#{anchor(eq.out.name)}",
                          f"{eq.out.name}: {eq.note}" if eq.note else eq.out.name)
        for name in sorted({r for r, _ in eq.reads() if r in model.tensors}, key=order.__getitem__):
            edges.append((tensor_node(name), key))
        edges.append((key, tensor_node(eq.out.name)))
    return nodes, edges


def _layer_label(layer: str) -> str:
    """'3:residual(...).2:relu' -> 'relu'; a long name is cut at its arguments: 'residual(…)'."""
    label = layer.rsplit(":", 1)[-1] if layer else ""
    return label if len(label) <= 22 else label.split("(", 1)[0] + "(…)"


def _layout(nodes: dict, edges: list):
    """Rows by longest path from a source; columns in order of appearance within a row."""
    preds = {k: [] for k in nodes}
    for a, b in edges:
        preds[b].append(a)
    for key in nodes:                       # nodes are in dependency order (graph_nodes builds them so)
        nodes[key].row = max((nodes[p].row + 1 for p in preds[key]), default=0)
    # pull every source (a parameter, an input) down to the row just above its first reader
    for key, node in nodes.items():
        if not preds[key]:
            readers = [nodes[b].row for a, b in edges if a == key]
            node.row = max(0, min(readers) - 1) if readers else 0
    per_row: dict = {}
    for node in nodes.values():
        node.col = per_row.get(node.row, 0)
        per_row[node.row] = node.col + 1
    return max(per_row.values(), default=1), max(per_row, default=0) + 1


def _xy(node: Node) -> tuple[float, float]:
    return LEFT + node.col * COL + NODE_W / 2, PAD + node.row * ROW + NODE_H / 2


def _edge(a: Node, b: Node) -> str:
    """From the bottom of ``a`` to the top of ``b``; an edge that skips rows leaves ``a``'s left side
    and bows out to the left, so that it never runs hidden behind the nodes between them."""
    (x1, y1), (x2, y2) = _xy(a), _xy(b)
    if b.row - a.row > 1:
        x1, x2 = x1 - NODE_W / 2, x2 - NODE_W / 2
        bow = min(x1, x2) - LEFT + 8
        d = f"M{x1:.0f},{y1:.0f} C{bow:.0f},{y1:.0f} {bow:.0f},{y2:.0f} {x2:.0f},{y2:.0f}"
        return f'<path class="edge skip" d="{d}" marker-end="url(#arrow)"/>'
    y1, y2 = y1 + NODE_H / 2, y2 - NODE_H / 2
    mid = (y1 + y2) / 2
    return (f'<path class="edge" d="M{x1:.0f},{y1:.0f} C{x1:.0f},{mid:.0f} {x2:.0f},{mid:.0f} '
            f'{x2:.0f},{y2:.0f}" marker-end="url(#arrow)"/>')


def model_svg(model: Model) -> str:
    nodes, edges = graph_nodes(model)
    cols, rows = _layout(nodes, edges)
    width, height = LEFT + PAD + (cols - 1) * COL + NODE_W, 2 * PAD + (rows - 1) * ROW + NODE_H
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="graph" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="computation graph of {escape(model.name)}">',
             '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
             'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#667"/></marker></defs>']
    for a, b in edges:
        parts.append(_edge(nodes[a], nodes[b]))
    for node in nodes.values():
        x, y = _xy(node)
        shape = (f'<rect x="{x - NODE_W / 2:.0f}" y="{y - NODE_H / 2:.0f}" width="{NODE_W}" height="{NODE_H}" '
                 f'rx="{17 if node.kind != "equation" else 3}"/>')
        text = (f'<text x="{x:.0f}" y="{y - 3:.0f}" class="label">{escape(node.label)}</text>'
                f'<text x="{x:.0f}" y="{y + 11:.0f}" class="sub">{escape(node.sub)}</text>')
        body = f'<g class="node {node.kind}"><title>{escape(node.title)}</title>{shape}{text}</g>'
        if node.href:
            body = f'<a href="{node.href}">{body}</a>'
        parts.append(body)
    parts.append("</svg>")
    return "\n".join(parts)
