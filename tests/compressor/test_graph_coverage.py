"""Coverage: build, prune ~50% of every prunable group, check soundness, MACs and ONNX parity
on the torchvision zoo (random weights), the option-A CIFAR ResNet, and the CIFAR shapes of
``bench/cifar_shapes.py`` (community idioms: ``view(size(0), -1)``, empty Sequential shortcuts,
in-place additions, pre-activation, squeeze-excitation, DenseNet concatenations).

Excluded groups per model are printed (``pytest -s``) and checked against what we expect.
"""

from __future__ import annotations

import io

import pytest
import torch
from conftest import load_cifar_resnet, load_cifar_shapes, randomize_bn
from torch import nn

from compressor import graph as G

torch.set_num_threads(1)

SLOW = pytest.mark.slow

# model -> (constructor kwargs, expected excluded reasons (substrings) besides the classifier output)
# ShuffleNetV2: the stage trunks go through concat + channel shuffle (view/transpose/view) and
# chunk; those groups are left whole; the branch-internal groups (1x1 -> depthwise -> 1x1) prune.
MODELS = {
    "resnet18": ({}, []),
    "resnet50": ({}, []),
    "wide_resnet50_2": ({}, []),
    "resnext50_32x4d": ({}, []),
    "vgg11_bn": ({}, []),
    "mobilenet_v2": ({}, []),
    "mobilenet_v3_small": ({}, []),
    "mobilenet_v3_large": ({}, []),
    "efficientnet_b0": ({}, []),
    "regnet_y_400mf": ({}, []),
    "densenet121": ({}, []),
    "shufflenet_v2_x1_0": ({}, ["channel shuffle"]),
    "squeezenet1_1": ({}, []),
    "googlenet": ({"aux_logits": False, "init_weights": True}, []),
    "mnasnet1_0": ({}, []),
    "convnext_tiny": ({}, []),
}
HEAVY = {"wide_resnet50_2", "densenet121", "convnext_tiny", "vgg11_bn", "resnext50_32x4d"}


def onnx_outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    import onnxruntime as ort

    buf = io.BytesIO()
    torch.onnx.export(model.eval(), (x,), buf, opset_version=17, dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {"x": x.numpy()})[0])


def _check(name: str, model: nn.Module, shape: tuple[int, ...], expected: list[str], onnx_shape=None) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, *shape)
    graph = G.build_graph(model, x[:1])
    excluded = [(g.root, g.size, g.reason) for g in graph.excluded]
    print(f"\n{name}: {len(graph.groups)} groups, {len(excluded)} excluded")
    for root, size, reason in excluded:
        print(f"  {root} ({size}): {reason}")
    # exactly the classifier output, plus the expected kinds of exclusions
    outputs = [e for e in excluded if e[2] == "model output channels"]
    assert len(outputs) == 1
    for _, _, reason in excluded:
        assert reason == "model output channels" or any(s in reason for s in expected), reason
    prunable = [g for g in graph.groups if g.prunable]
    assert len(prunable) >= (0.4 if expected else 0.9) * len(graph.groups)

    plan = G.random_plan(graph, 0.5, seed=0)
    pruned = G.apply_plan(graph, plan)
    with torch.no_grad():
        ref = graph.model(x)
        out = pruned.model(x)
    assert out.shape == ref.shape
    scale = float(ref.abs().max())
    diff = G.soundness_diff(graph, plan, pruned.model, x)
    assert diff <= 1e-4 * scale + 1e-4, (diff, scale)

    est = G.estimate_macs(graph, {gid: len(k) for gid, k in plan.items()})
    exact, params = G.count_macs_params(pruned.model, x)
    full, params0 = G.count_macs_params(graph.model, x)
    assert abs(est - exact) <= 0.01 * exact
    assert exact < 0.75 * full and params < params0

    xo = torch.randn(2, *(onnx_shape or shape))
    with torch.no_grad():
        ref_o = pruned.model(xo)
    onnx_diff = float((onnx_outputs(pruned.model, xo) - ref_o).abs().max())
    assert onnx_diff <= 1e-4 * float(ref_o.abs().max()) + 1e-4
    print(f"  MACs kept {exact / full:.3f}, params kept {params / params0:.3f}, soundness {diff:.2e} "
          f"(scale {scale:.2e}), onnx {onnx_diff:.2e}")


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=SLOW) if n in HEAVY else n for n in MODELS]
)
def test_torchvision_model(name):
    import torchvision

    kwargs, expected = MODELS[name]
    torch.manual_seed(0)
    model = randomize_bn(getattr(torchvision.models, name)(**kwargs))
    # the ONNX exporter cannot export adaptive_avg_pool2d 2x2 -> 7x7 (VGG at 64x64); use 224 there
    onnx_shape = (3, 224, 224) if name == "vgg11_bn" else None
    _check(name, model, (3, 64, 64), expected, onnx_shape)


def test_cifar_resnet20():
    _check("cifar_resnet20", randomize_bn(load_cifar_resnet(20)), (3, 32, 32), [])


@pytest.mark.parametrize("name", sorted(load_cifar_shapes().SHAPES))
def test_cifar_shape(name):
    torch.manual_seed(0)
    # at a quarter width the first squeeze-excitation bottlenecks (channels // 16) hold one channel
    expected = ["a single channel"] if name == "cifar_senet18" else []
    _check(name, randomize_bn(load_cifar_shapes().build(name, width=0.25)), (3, 32, 32), expected)
