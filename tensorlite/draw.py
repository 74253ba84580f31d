"""Draw the computation graph that produced a tensor, as micrograd's ``draw_dot`` does.

    y = (x * w + b).tanh()
    y.backward(retain_graph=True)        # keep the graph to draw it with its gradients
    tl.draw_graph(y, "graph.svg")

Two kinds of node: an op (``Mul``, ``Tanh``: the ``Function`` that ran) and a tensor (its
name if it has one, shape, dtype and, when it holds at most ``max_values`` numbers, its
values and gradient). Edges run from the inputs to the op to its output, so the picture reads
as the forward pass, left to right; backward walks it right to left.

The format is the path's suffix. ``.dot`` (or ``.gv``) is Graphviz's source text, always
written. ``.svg``, ``.png`` and ``.pdf`` are rendered by Graphviz's ``dot`` program when it is
on the PATH, otherwise by a layered matplotlib drawing (said once per process, as a warning).
Nothing here is imported until a graph is drawn: ``import tensorlite`` stays light.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import backend

FORMATS = (".dot", ".gv", ".svg", ".png", ".pdf")
RENDERERS = ("auto", "dot", "matplotlib")
_said_fallback = False


@dataclass
class Drawing:
    """What ``draw_graph`` wrote: the file, who drew it ("dot", "matplotlib" or "dot-source")
    and the graph's size. Usable wherever a path is (``os.fspath(drawing)``)."""
    path: Path
    renderer: str
    ops: int
    tensors: int

    def __fspath__(self) -> str:
        return os.fspath(self.path)


# ----------------------------------------------------------------------------- the graph
@dataclass
class _Node:
    key: int
    kind: str            # "tensor", "op" or "const"
    label: str           # lines joined by "\n"


def _fmt_array(a, max_values: int) -> str | None:
    """Small arrays as text (4 significant digits); None when larger than max_values."""
    a = backend.to_numpy(a)
    if a.size > max_values:
        return None
    if a.ndim == 0:
        return f"{a.item():.4g}" if a.dtype.kind == "f" else str(a.item())
    return np.array2string(a, precision=4, separator=", ", max_line_width=60,
                           suppress_small=False, threshold=max_values + 1)


def _tensor_label(t, max_values: int) -> str:
    head = t.name if getattr(t, "name", None) else ("param" if t.is_leaf and t.requires_grad
                                                   else "tensor" if t.is_leaf else "")
    shape = "x".join(str(n) for n in t.shape) or "scalar"
    lines = [f"{head} {shape} {t.dtype}".strip()]
    vals = _fmt_array(t.data, max_values)
    if vals is not None:
        lines.append("data " + vals)
    if t.grad is not None:
        g = _fmt_array(t.grad.data, max_values)
        lines.append("grad " + g if g is not None else "grad (set)")
    return "\n".join(lines)


def build_graph(tensor, max_values: int = 16):
    """(nodes, edges, freed) of the graph behind ``tensor``: nodes in a topological order
    (inputs first), edges (from_key, to_key), and whether part of it was freed by a backward."""
    from .tensor import Tensor
    if not isinstance(tensor, Tensor):
        raise TypeError(f"draw_graph: expected a Tensor, got {type(tensor).__name__}")
    nodes, edges, keep = {}, [], []       # keep: objects whose id() is a key stay alive
    freed = False
    stack = [tensor]
    while stack:                          # iterative: a 10,000-op chain is fine
        t = stack.pop()
        if id(t) in nodes:
            continue
        keep.append(t)
        nodes[id(t)] = _Node(id(t), "tensor", _tensor_label(t, max_values))
        ctx = t._ctx
        if ctx is None:
            continue
        keep.append(ctx)
        op_label = ctx.name
        if getattr(ctx, "freed", False):
            freed = True
            op_label += "\n(inputs freed by backward)"
        nodes[id(ctx)] = _Node(id(ctx), "op", op_label)
        edges.append((id(ctx), id(t)))
        for p in (ctx.inputs() if hasattr(ctx, "versions") else getattr(ctx, "parents", ())):
            if p is None:
                continue
            edges.append((id(p), id(ctx)))
            if isinstance(p, Tensor):
                stack.append(p)
            elif id(p) not in nodes:       # a raw array or number the op took as an input
                keep.append(p)
                shape = "x".join(str(n) for n in getattr(p, "shape", ())) or "scalar"
                vals = _fmt_array(p, max_values) if hasattr(p, "shape") else repr(p)
                nodes[id(p)] = _Node(id(p), "const", f"constant {shape}" +
                                     (f"\n{vals}" if vals is not None else ""))
    # a topological order (Kahn), inputs first
    indeg = {k: 0 for k in nodes}
    outs = {k: [] for k in nodes}
    for a, b in edges:
        indeg[b] += 1
        outs[a].append(b)
    ready = [k for k in nodes if indeg[k] == 0]
    topo = []
    while ready:
        k = ready.pop()
        topo.append(k)
        for b in outs[k]:
            indeg[b] -= 1
            if indeg[b] == 0:
                ready.append(b)
    return [nodes[k] for k in topo], edges, freed


# ----------------------------------------------------------------------------- renderers
def _dot_escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def to_dot(nodes, edges) -> str:
    """Graphviz source: tensors as boxes, ops as ellipses, left to right."""
    lines = ["digraph tensorlite {", '  rankdir=LR;',
             '  node [fontname="Helvetica", fontsize=10];']
    style = {"tensor": 'shape=box, style="rounded,filled", fillcolor="#e8f0fe"',
             "op": 'shape=ellipse, style=filled, fillcolor="#fde7c8"',
             "const": 'shape=box, style="dashed"'}
    name = {n.key: f"n{i}" for i, n in enumerate(nodes)}
    for n in nodes:
        lines.append(f'  {name[n.key]} [label="{_dot_escape(n.label)}", {style[n.kind]}];')
    for a, b in edges:
        lines.append(f"  {name[a]} -> {name[b]};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _layers(nodes, edges):
    """Column of each node: the longest path from an input (nodes come inputs first), then
    each input pulled right to just before its first user, so its arrow stays short."""
    col = {n.key: 0 for n in nodes}
    ins = {n.key: [] for n in nodes}
    outs = {n.key: [] for n in nodes}
    for a, b in edges:
        ins[b].append(a)
        outs[a].append(b)
    for n in nodes:
        if ins[n.key]:
            col[n.key] = 1 + max(col[a] for a in ins[n.key])
    for n in nodes:
        if not ins[n.key] and outs[n.key]:
            col[n.key] = min(col[b] for b in outs[n.key]) - 1
    return col, ins, outs


def _draw_matplotlib(nodes, edges, path: Path) -> None:
    """A layered drawing: one column per depth, nodes in a column ordered by the mean row of
    their inputs (one barycentre pass), arrows from the right edge of an input's box to the
    left edge of its user's."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    col, ins, outs = _layers(nodes, edges)
    ncols = max(col.values()) + 1
    columns = [[] for _ in range(ncols)]
    for n in nodes:
        columns[col[n.key]].append(n)
    row = {}

    def place(members):
        for r, n in enumerate(members):
            row[n.key] = (len(members) - 1) / 2 - r

    def by_mean(nbrs):   # sort key: the mean row of the placed neighbours, top first
        def key(n):
            rs = [row[a] for a in nbrs[n.key] if a in row]
            return -np.mean(rs) if rs else 0.0
        return key
    for members in columns:
        place(members)
    for _ in range(2):   # barycentre sweeps, to uncross edges: by inputs, then by users
        for members in columns[1:]:
            members.sort(key=by_mean(ins))
            place(members)
        for members in reversed(columns[:-1]):
            members.sort(key=by_mean(outs))
            place(members)
    nrows = max(len(m) for m in columns)
    # sizes in inches (data coordinates are inches): each column as wide as its widest label
    widths = [0.6 + 0.085 * max(max(len(line) for line in n.label.split("\n")) for n in m)
              if m else 0.6 for m in columns]
    xs = np.concatenate([[0.0], np.cumsum(widths)])
    tall = max(n.label.count("\n") + 1 for n in nodes)
    rowh = max(0.8, 0.18 * tall + 0.35)
    fig_w, fig_h = min(xs[-1], 300), min(rowh * nrows, 300)
    fig = plt.figure(figsize=(fig_w, fig_h))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, xs[-1])
    ax.set_ylim(-rowh * nrows / 2, rowh * nrows / 2)
    ax.axis("off")
    pos = {n.key: ((xs[col[n.key]] + xs[col[n.key] + 1]) / 2, rowh * row[n.key]) for n in nodes}
    colors = {"tensor": "#e8f0fe", "op": "#fde7c8", "const": "#ffffff"}
    texts = {}
    for n in nodes:
        texts[n.key] = ax.text(
            *pos[n.key], n.label.replace("$", r"\$"), ha="center", va="center",
            fontsize=8, family="monospace", zorder=3,
            bbox=dict(boxstyle="round,pad=0.3" if n.kind != "op" else "round4,pad=0.3",
                      fc=colors[n.kind], ec="#333333", ls="--" if n.kind == "const" else "-"))
    fig.canvas.draw()                                   # the boxes' sizes, for the arrows
    inv = ax.transData.inverted()
    half = {k: (inv.transform(t.get_bbox_patch().get_window_extent())[1, 0] - pos[k][0])
            for k, t in texts.items()}
    for a, b in edges:
        (xa, ya), (xb, yb) = pos[a], pos[b]
        ax.annotate("", xy=(xb - half[b], yb), xytext=(xa + half[a], ya),
                    arrowprops=dict(arrowstyle="-|>", color="#3060a0", lw=0.8, alpha=0.8,
                                    shrinkA=1, shrinkB=1, connectionstyle="arc3,rad=0.12"),
                    zorder=4)      # over the boxes: an edge that crosses one stays visible
    fig.savefig(path, format=path.suffix[1:], dpi=110)
    plt.close(fig)


def _say_once(message: str) -> None:
    global _said_fallback
    if not _said_fallback:
        _said_fallback = True
        warnings.warn(message, stacklevel=3)


def draw_graph(tensor, path, max_values: int = 16, renderer: str = "auto") -> Drawing:
    """Draw the graph that produced ``tensor`` into ``path`` (format from its suffix:
    .dot/.gv source, or .svg/.png/.pdf). ``renderer``: "auto" (Graphviz's dot when on the PATH,
    else matplotlib, said once), "dot" or "matplotlib". Tensors with at most ``max_values``
    numbers show their values and gradients. Draw before ``backward()``, or after
    ``backward(retain_graph=True)``: a plain backward frees the graph's inputs (the op nodes
    then say so). Returns a ``Drawing`` (path, renderer, counts); the file is written whole
    or not at all."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"draw_graph: cannot tell the format of {str(path)!r} from its suffix "
                         f"{suffix or '(none)'!r}; use one of {', '.join(FORMATS)}")
    if renderer not in RENDERERS:
        raise ValueError(f"draw_graph: renderer must be one of {RENDERERS}, got {renderer!r}")
    if not isinstance(max_values, int) or max_values < 0:
        raise ValueError(f"draw_graph: max_values must be an int >= 0, got {max_values!r}")
    nodes, edges, freed = build_graph(tensor, max_values)
    if freed:
        warnings.warn("draw_graph: part of this graph was freed by backward(), so its inputs are "
                      "missing; draw before backward(), or call backward(retain_graph=True)",
                      stacklevel=2)
    source = to_dot(nodes, edges)
    n_ops = sum(n.kind == "op" for n in nodes)
    n_tensors = sum(n.kind == "tensor" for n in nodes)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    mask = os.umask(0)                  # mkstemp makes it 0600: give it a file's usual mode
    os.umask(mask)
    os.chmod(tmp_name, 0o666 & ~mask)
    tmp = Path(tmp_name)
    try:
        if suffix in (".dot", ".gv"):
            tmp.write_text(source)
            used = "dot-source"
        else:
            dot = shutil.which("dot") if renderer in ("auto", "dot") else None
            if renderer == "dot" and dot is None:
                raise RuntimeError("draw_graph: renderer='dot' but Graphviz's dot program is not "
                                   "on the PATH; install Graphviz, or use renderer='auto'")
            if dot is not None:
                r = subprocess.run([dot, f"-T{suffix[1:]}", "-o", str(tmp)], input=source,
                                   capture_output=True, text=True)
                if r.returncode != 0 or tmp.stat().st_size == 0:
                    raise RuntimeError(f"draw_graph: {dot} failed (exit {r.returncode}): "
                                       f"{r.stderr.strip()[:500]}")
                used = "dot"
            else:
                if renderer == "auto":
                    _say_once("draw_graph: Graphviz's dot program is not on the PATH; drawing "
                              "with matplotlib instead (install Graphviz for its layout, or "
                              "write a .dot file)")
                _draw_matplotlib(nodes, edges, tmp)
                used = "matplotlib"
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return Drawing(path, used, n_ops, n_tensors)
