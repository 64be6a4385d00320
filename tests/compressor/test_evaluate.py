import pytest
import torch
from torch import nn

from compressor import evaluate
from compressor.errors import CompressorError


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 5)).eval()


def test_onnxruntime_and_torch_agree():
    model = _net()
    images = torch.randn(300, 3, 8, 8)  # more than one onnxruntime batch
    labels = evaluate.predict(model, images).argmax(1)
    labels[::3] = (labels[::3] + 1) % 5  # a third wrong: accuracy 2/3
    ort_logits, used = evaluate.logits(model, images)
    assert used == "onnxruntime"
    assert torch.allclose(ort_logits, evaluate.predict(model, images), atol=1e-4)
    acc_ort, _ = evaluate.accuracy(model, images, labels, backend="onnxruntime")
    acc_torch, used_torch = evaluate.accuracy(model, images, labels, backend="torch")
    assert used_torch == "torch"
    assert acc_ort == pytest.approx(acc_torch) == pytest.approx(200 / 300)


def test_uses_an_existing_export(tmp_path, monkeypatch):
    from export.onnx import export_onnx

    model, images = _net(), torch.randn(6, 3, 8, 8)
    path = export_onnx(model, images[:1], tmp_path / "m.onnx")
    monkeypatch.setattr("export.onnx.export_onnx", lambda *a, **k: pytest.fail("exported again"))
    out, used = evaluate.logits(model, images, onnx_path=path)
    assert used == "onnxruntime" and torch.allclose(out, evaluate.predict(model, images), atol=1e-4)


def test_a_mismatching_export_is_not_used(tmp_path):
    from export.onnx import export_onnx

    model, images = _net(), torch.randn(6, 3, 8, 8)
    other = _net()
    with torch.no_grad():
        other[-1].weight.mul_(-1)
    path = export_onnx(other, images[:1], tmp_path / "other.onnx")
    out, used = evaluate.logits(model, images, onnx_path=path)
    assert used == "torch" and torch.allclose(out, evaluate.predict(model, images))
    with pytest.raises(CompressorError, match="does not match the model"):
        evaluate.logits(model, images, backend="onnxruntime", onnx_path=path)


def test_falls_back_to_torch_when_export_fails(monkeypatch):
    def broken(*args, **kwargs):
        raise CompressorError("ONNX export failed: unsupported op")

    monkeypatch.setattr("export.onnx.export_onnx", broken)
    model, images = _net(), torch.randn(4, 3, 8, 8)
    out, used = evaluate.logits(model, images)
    assert used == "torch" and out.shape == (4, 5)
    with pytest.raises(CompressorError, match="unsupported op"):
        evaluate.logits(model, images, backend="onnxruntime")


def test_bad_input_is_rejected():
    model, images = _net(), torch.randn(4, 3, 8, 8)
    with pytest.raises(CompressorError, match="4 images but 3 labels"):
        evaluate.accuracy(model, images, torch.zeros(3, dtype=torch.long))
    with pytest.raises(CompressorError, match="'tensorrt' is unknown"):
        evaluate.logits(model, images, backend="tensorrt")


def test_large_images_get_smaller_batches(monkeypatch):
    seen = []

    class Session:
        def run(self, _outputs, feeds):
            batch = next(iter(feeds.values()))
            seen.append(len(batch))
            return [batch.reshape(len(batch), -1)[:, :5]]

    monkeypatch.setattr("export.onnx.ort_session", lambda path: Session())
    monkeypatch.setattr("export.onnx.check_onnx", lambda *args: None)
    monkeypatch.setattr(evaluate, "ORT_BATCH_ELEMENTS", 3 * 8 * 8 * 10)  # ten 3x8x8 images a batch
    out = evaluate.predict_onnxruntime(_net(), torch.randn(25, 3, 8, 8))
    assert seen == [10, 10, 5] and out.shape == (25, 5)
