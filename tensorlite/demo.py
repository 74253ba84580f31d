"""A two-minute look at the engine: draw the graph of one neuron, then fit a small MLP to a
noisy sine with plain tensorlite.

    python -m tensorlite.demo [--graph tensorlite-demo-graph.svg] [--steps 2000]
"""
import argparse

import numpy as np

import tensorlite as tl


def draw_neuron(path="tensorlite-demo-graph.svg") -> "tl.draw.Drawing":
    """micrograd's neuron, o = tanh(x1 w1 + x2 w2 + b), its graph drawn with the values and
    gradients of every leaf (backward keeps the graph to be drawn)."""
    x1, x2 = tl.tensor(2.0, requires_grad=True), tl.tensor(0.0, requires_grad=True)
    w1, w2 = tl.tensor(-3.0, requires_grad=True), tl.tensor(1.0, requires_grad=True)
    b = tl.tensor(6.8813735870195432, requires_grad=True)
    for t, name in ((x1, "x1"), (x2, "x2"), (w1, "w1"), (w2, "w2"), (b, "b")):
        t.name = name
    o = (x1 * w1 + x2 * w2 + b).tanh()
    o.name = "o"
    o.backward(retain_graph=True)            # retain_graph: the graph is still there to draw
    return tl.draw_graph(o, path)


def main(steps: int = 2000, seed: int = 0, graph: str | None = "tensorlite-demo-graph.svg") -> list:
    if graph:
        d = draw_neuron(graph)
        print(f"the graph of o = tanh(x1*w1 + x2*w2 + b): {d.path} "
              f"({d.ops} ops, {d.tensors} tensors; drawn by {d.renderer})")
    tl.manual_seed(seed)
    rng = np.random.default_rng(seed)
    x = tl.tensor(rng.uniform(-3, 3, (256, 1)).astype(np.float32))
    y = tl.tensor(np.sin(x.numpy()) + 0.05 * rng.standard_normal((256, 1)).astype(np.float32))
    w1 = (tl.randn(1, 32) * 1.0).requires_grad_()
    b1 = tl.zeros(32, requires_grad=True)
    w2 = (tl.randn(32, 1) * 0.17).requires_grad_()
    b2 = tl.zeros(1, requires_grad=True)
    params, lr, losses = [w1, b1, w2, b2], 0.02, []
    for step in range(steps):
        pred = (x @ w1 + b1).tanh() @ w2 + b2
        loss = ((pred - y) ** 2).mean()
        for p in params:
            p.zero_grad()
        loss.backward()
        with tl.no_grad():
            for p in params:
                p -= lr * p.grad
        losses.append(loss.item())
        if step % 200 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    return losses


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--graph", default="tensorlite-demo-graph.svg",
                    help="where to draw the neuron's graph (.svg, .png, .pdf or .dot; '' for none)")
    ap.add_argument("--steps", type=int, default=2000)
    args = ap.parse_args()
    main(args.steps, graph=args.graph)
