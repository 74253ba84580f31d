"""tl.draw_graph: the graph it draws is the one autograd recorded (every op, every input, the
values and gradients), and each renderer writes a real file, whole or not at all."""
import os
import re
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import tensorlite as tl
from tensorlite import draw


def neuron():
    """micrograd's neuron: o = tanh(x1 w1 + x2 w2 + b), backward kept."""
    vals = dict(x1=2.0, x2=0.0, w1=-3.0, w2=1.0, b=6.8813735870195432)
    t = {k: tl.tensor(v, dtype=tl.float64, requires_grad=True) for k, v in vals.items()}
    for k, v in t.items():
        v.name = k
    o = (t["x1"] * t["w1"] + t["x2"] * t["w2"] + t["b"]).tanh()
    o.name = "o"
    o.backward(retain_graph=True)
    return o, t


def parse_dot(text):
    """{node: label}, [(from, to)] from our dot source."""
    nodes = dict(re.findall(r'^\s+(n\d+) \[label="((?:[^"\\]|\\.)*)"', text, re.M))
    edges = re.findall(r"^\s+(n\d+) -> (n\d+);", text, re.M)
    return {k: v.replace("\\n", "\n") for k, v in nodes.items()}, edges


def test_dot_source_is_the_recorded_graph(tmp_path):
    o, t = neuron()
    d = tl.draw_graph(o, tmp_path / "g.dot")
    assert d.renderer == "dot-source" and d.path == tmp_path / "g.dot"
    nodes, edges = parse_dot((tmp_path / "g.dot").read_text())
    ops = sorted(v for v in nodes.values() if "float64" not in v)
    assert ops == ["Add", "Add", "Mul", "Mul", "Tanh"]
    assert (d.ops, d.tensors) == (5, 10)        # 5 leaves, 4 intermediates, the output
    by_first = {v.split()[0]: k for k, v in nodes.items()}
    # each leaf shows its value and the gradient backward gave it (micrograd's numbers)
    expect_grad = {"x1": -1.5, "w1": 1.0, "x2": 0.5, "w2": 0.0, "b": 0.5}
    for name, g in expect_grad.items():
        label = nodes[by_first[name]]
        assert f"data {float(t[name].item()):.4g}" in label
        got = float(re.search(r"grad (\S+)", label).group(1))
        assert got == pytest.approx(float(t[name].grad.item()), abs=1e-4)
        assert got == pytest.approx(g, abs=1e-4)
    assert "data 0.7071" in nodes[by_first["o"]]
    # edges: every leaf feeds an op; the output is produced by Tanh
    tanh = next(k for k, v in nodes.items() if v == "Tanh")
    assert (tanh, by_first["o"]) in edges
    for name in expect_grad:
        assert any(a == by_first[name] and nodes[b] in ("Mul", "Add") for a, b in edges)
    assert len(edges) == 5 * 2 + 4 - 1 + 1       # ops: inputs + output each; Tanh: 1 input


def test_walks_shared_inputs_once_and_long_chains(tmp_path):
    x = tl.tensor([1.0, 2.0], requires_grad=True)
    y = x * x + x                                # x used three times
    nodes, edges, freed = draw.build_graph(y)
    assert sum(n.kind == "tensor" and n.label.startswith("param") for n in nodes) == 1
    assert not freed
    z = x
    for _ in range(3000):                        # no recursion limit
        z = z + 1.0
    nodes, edges, _ = draw.build_graph(z)
    assert sum(n.kind == "op" for n in nodes) == 3000
    keys = [n.key for n in nodes]                # a topological order: inputs first
    where = {k: i for i, k in enumerate(keys)}
    assert all(where[a] < where[b] for a, b in edges)


def test_values_shown_only_when_small_and_constants_drawn():
    a = tl.tensor(np.arange(20.0), requires_grad=True)
    b = (a * 3.0).sum()
    nodes, edges, _ = draw.build_graph(b, max_values=16)
    big = next(n for n in nodes if n.label.startswith("param"))
    assert "data" not in big.label and big.label == "param 20 float64"
    const = next(n for n in nodes if n.kind == "const")
    assert const.label == "constant scalar\n3.0"
    assert (const.key, next(n.key for n in nodes if n.label == "Mul")) in edges
    nodes, _, _ = draw.build_graph(b, max_values=20)
    assert "data [ 0.," in next(n for n in nodes if n.label.startswith("param")).label


def test_freed_graph_is_said(tmp_path):
    x = tl.tensor([1.0, 2.0], requires_grad=True)
    y = (x * 2).sum()
    y.backward()
    with pytest.warns(UserWarning, match="retain_graph=True"):
        tl.draw_graph(y, tmp_path / "g.dot")
    assert "inputs freed by backward" in (tmp_path / "g.dot").read_text()


@pytest.mark.parametrize("suffix", [".png", ".svg", ".pdf"])
def test_matplotlib_renderer_writes_a_real_picture(tmp_path, suffix):
    o, _ = neuron()
    d = tl.draw_graph(o, tmp_path / f"g{suffix}", renderer="matplotlib")
    data = (tmp_path / f"g{suffix}").read_bytes()
    magic = {".png": b"\x89PNG", ".svg": b"<?xml", ".pdf": b"%PDF"}[suffix]
    assert d.renderer == "matplotlib" and data.startswith(magic) and len(data) > 2000
    if suffix == ".png":                         # not a blank canvas
        import matplotlib.image as mpimg
        img = mpimg.imread(tmp_path / "g.png")
        assert img.shape[0] > 50 and img.shape[1] > 200
        assert (img[..., :3] < 0.5).mean() > 0.002
    if suffix == ".svg":
        assert "Tanh" in data.decode()
    assert sorted(os.listdir(tmp_path)) == [f"g{suffix}"]   # no temporary left behind


def test_auto_falls_back_to_matplotlib_and_says_so_once(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(draw, "_said_fallback", False)
    o, _ = neuron()
    with pytest.warns(UserWarning, match="dot program is not on the PATH"):
        d = tl.draw_graph(o, tmp_path / "a.png")
    assert d.renderer == "matplotlib"
    with warnings.catch_warnings():
        warnings.simplefilter("error")           # the second time: silent
        assert tl.draw_graph(o, tmp_path / "b.png").renderer == "matplotlib"
    with pytest.raises(RuntimeError, match="dot program is not on the PATH"):
        tl.draw_graph(o, tmp_path / "c.png", renderer="dot")


def fake_dot(folder: Path) -> Path:
    """A `dot` on the PATH that records its arguments and copies its input to -o."""
    folder.mkdir()
    script = folder / "dot"
    script.write_text(f"""#!{sys.executable}
import sys
args = sys.argv[1:]
src = sys.stdin.read()
open(args[args.index("-o") + 1], "w").write("RENDERED " + " ".join(args[:1]) + "\\n" + src)
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return folder


def test_dot_renderer_runs_graphviz_with_the_suffix_format(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(fake_dot(tmp_path / "bin")) + os.pathsep + os.environ["PATH"])
    o, _ = neuron()
    d = tl.draw_graph(o, tmp_path / "g.svg")
    text = (tmp_path / "g.svg").read_text()
    assert d.renderer == "dot" and text.startswith("RENDERED -Tsvg") and "Tanh" in text


def test_dot_failure_leaves_no_file(tmp_path, monkeypatch):
    bad = tmp_path / "bin"
    bad.mkdir()
    (bad / "dot").write_text("#!/bin/sh\necho 'syntax error' >&2\nexit 3\n")
    (bad / "dot").chmod(0o755)
    monkeypatch.setenv("PATH", str(bad))
    o, _ = neuron()
    with pytest.raises(RuntimeError, match="exit 3.*syntax error"):
        tl.draw_graph(o, tmp_path / "g.png")
    assert sorted(os.listdir(tmp_path)) == ["bin"]


@pytest.mark.skipif(not __import__("shutil").which("dot"), reason="Graphviz's dot is not installed")
def test_real_graphviz(tmp_path):
    o, _ = neuron()
    assert tl.draw_graph(o, tmp_path / "g.png").renderer == "dot"
    assert (tmp_path / "g.png").read_bytes().startswith(b"\x89PNG")


def test_bad_arguments_are_named(tmp_path):
    o, _ = neuron()
    with pytest.raises(ValueError, match=r"suffix '\.jpg'.*\.dot, \.gv, \.svg, \.png, \.pdf"):
        tl.draw_graph(o, tmp_path / "g.jpg")
    with pytest.raises(ValueError, match="renderer must be one of"):
        tl.draw_graph(o, tmp_path / "g.png", renderer="cairo")
    with pytest.raises(TypeError, match="expected a Tensor, got ndarray"):
        tl.draw_graph(np.zeros(2), tmp_path / "g.dot")


def test_import_tensorlite_stays_light():
    code = ("import sys, tensorlite as tl; assert callable(tl.draw_graph); "
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('matplotlib', 'nn', 'gpt', 'parallel')]; print(bad)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_demo_draws_its_graph(tmp_path, capsys):
    from tensorlite import demo
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        losses = demo.main(steps=3, graph=str(tmp_path / "neuron.svg"))
    assert len(losses) == 3
    out = capsys.readouterr().out
    assert str(tmp_path / "neuron.svg") in out and "5 ops, 10 tensors" in out
    assert (tmp_path / "neuron.svg").stat().st_size > 2000
