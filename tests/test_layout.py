"""The layout of a step's 4-d tensors (docs/design.md §4 "Layout", ``mlaan_func.core.layout``):
a step keeps the layout it is given (its gradients stay bit for bit) unless asked for
channels-last, which compiled graphs then see throughout; a net that channels-last breaks on
the CPU is refused it; and nothing a run carries (checkpoints, resume) depends on the layout."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mlaan_func as mf
from mlaan_func import testing as mt
from mlaan_func.core import layout

CL = torch.channels_last


def scheme_of(widths=(8, 16, 16)):
    net = mf.from_module(mf.models.CifarResNet(8, num_classes=5, widths=widths))
    return mf.schemes.build("dgl", net, ["1.0", "2.0"], input_shape=(3, 8, 8))


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 5, (6,), generator=g)


def laid_out_cl(tensors):
    return {k: v.is_contiguous(memory_format=CL) for k, v in tensors.items() if v.dim() == 4}


def counting():
    """A backend counting the graphs it compiles and the layouts of their 4-d inputs."""
    inner = torch._dynamo.lookup_backend("aot_eager")
    count = {"graphs": 0, "layouts": set()}

    def compiler(gm, example_inputs):
        count["graphs"] += 1
        count["layouts"] |= {"channels_last" if t.is_contiguous(memory_format=CL) else "other"
                             for t in example_inputs if isinstance(t, torch.Tensor) and t.dim() == 4}
        return inner(gm, example_inputs)

    return compiler, count


@settings(deadline=None, max_examples=20)
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=5))
def test_convert_changes_strides_never_values(shape):
    t = torch.randn(*shape)
    got = layout.convert({"t": t, "i": torch.ones(shape, dtype=torch.int64)}, CL)
    assert torch.equal(got["t"], t) and got["i"].dtype == torch.int64
    if len(shape) == 4:
        assert got["t"].is_contiguous(memory_format=CL)
    else:
        assert got["t"] is t
    x, y = batch()
    bx, by = layout.convert_batch(mf.Batch(x, y), CL)
    assert torch.equal(bx, x) and bx.is_contiguous(memory_format=CL) and by is y


def test_a_compiled_channels_last_step_is_close_to_eager_and_never_recompiles():
    torch._dynamo.reset()
    scheme, opt = scheme_of(), mf.optim.sgd(0.1, momentum=0.9)
    ts = mf.init(scheme, opt, seed=0)
    eager = mf.step(scheme, opt)
    compiler, count = counting()
    compiled = mf.step(scheme, opt, compile=True, backend=compiler, memory_format=CL)
    want, got = ts, ts
    for i in range(3):
        want, _ = eager(want, batch(i))
        got, _ = compiled(got, batch(i))
        if i == 0:
            graphs = count["graphs"]
    assert count["layouts"] == {"channels_last"}, "a compiled graph took a 4-d tensor not in channels-last"
    assert all(v.is_contiguous() for v in want.params.values()), "the eager step changed its layout"
    assert count["graphs"] == graphs, "the compiled step recompiled once its tensors were channels-last"
    mt.assert_close(got.params, want.params, 1e-3)
    mt.assert_close(got.state, want.state, 1e-3)


def test_eager_step_keeps_its_layout_bit_for_bit_and_channels_last_when_asked():
    scheme, opt = scheme_of(), mf.optim.sgd(0.1, momentum=0.9)
    ts = mf.init(scheme, opt, seed=0)
    plain, _ = mf.step(scheme, opt)(ts, batch())
    kept, _ = mf.step(scheme, opt, memory_format=torch.preserve_format)(ts, batch())
    for k in plain.params:
        assert torch.equal(plain.params[k], kept.params[k]) and plain.params[k].stride() == kept.params[k].stride()
    asked, _ = mf.step(scheme, opt, memory_format=CL)(ts, batch())
    assert all(laid_out_cl(asked.params).values())
    mt.assert_close(asked.params, plain.params, 1e-3)


def test_asking_channels_last_for_a_net_it_breaks_raises_naming_the_convolution():
    scheme, opt = scheme_of(widths=(4, 8, 8)), mf.optim.sgd(0.1)  # 4 -> 8, 1x1 stride 2: the CPU fault
    assert mf.train.step.faulty_convolutions(scheme) == ["2.0.shortcut.0"]
    assert mf.train.step.faulty_convolutions(scheme_of()) == []
    ts = mf.init(scheme, opt, seed=0)
    with pytest.raises(ValueError, match=r"2\.0\.shortcut\.0.*memory_format=None"):
        mf.step(scheme, opt, memory_format=CL)(ts, batch())
    with pytest.raises(ValueError, match="memory_format must be"):
        mf.gradients(scheme, memory_format="nhwc")(ts, batch())


def test_a_channels_last_run_resumes_bitwise_from_its_checkpoint(tmp_path):
    torch._dynamo.reset()
    scheme, opt = scheme_of(), mf.optim.sgd(0.1, momentum=0.9)
    step = mf.step(scheme, opt, compile=True, backend="aot_eager", memory_format=CL)
    ts, _ = step(mf.init(scheme, opt, seed=0), batch(0))
    mf.save(tmp_path / "ckpt", ts)
    loaded = mf.load(tmp_path / "ckpt")
    on, _ = step(ts, batch(1))
    resumed, _ = step(loaded, batch(1))
    for k in on.params:
        assert torch.equal(on.params[k], resumed.params[k]), k
    for k in on.state:
        assert torch.equal(on.state[k], resumed.state[k]), k
