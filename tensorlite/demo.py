"""A two-minute look at the engine: fit a small MLP to a noisy sine with plain tensorlite.

    python -m tensorlite.demo
"""
import numpy as np

import tensorlite as tl


def main(steps: int = 2000, seed: int = 0) -> list:
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
    main()
