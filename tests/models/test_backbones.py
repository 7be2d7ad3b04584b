"""Tests for the offline backbone factory (fsad_pipeline.models.backbones)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from fsad_pipeline.models.backbones import (
    BackboneWeightsUnavailable,
    FeatureBackbone,
    available_backbones,
    build_backbone,
    build_imagenet_classifier,
    fold_conv_batch_norms,
    get_backbone_spec,
)

ESPRESSO = 967


@pytest.fixture()
def offline_empty_caches(tmp_path, monkeypatch):
    """No network and empty HF / torch caches."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    return tmp_path


def _coffee(size: int) -> torch.Tensor:
    skimage_data = pytest.importorskip("skimage.data")
    image = torch.from_numpy(skimage_data.coffee()).permute(2, 0, 1)[None].float() / 255.0
    return F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def test_registry_lists_all_backbones():
    assert available_backbones()[0] == "efficientnet_lite0"
    assert set(available_backbones()) >= {"efficientnet_lite0", "efficientnet_lite2", "wide_resnet50_2", "resnet18"}
    with pytest.raises(KeyError, match="available"):
        get_backbone_spec("no_such_net")


@pytest.mark.parametrize(("name", "size"), [("efficientnet_lite0", 224), ("efficientnet_lite2", 260)])
def test_lite_classifier_predicts_espresso(name, size):
    spec = get_backbone_spec(name)
    classifier = build_imagenet_classifier(name)
    image = _coffee(size)
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        probabilities = classifier((image - mean) / std).softmax(dim=-1)
    assert int(probabilities.argmax()) == ESPRESSO
    assert float(probabilities.max()) > 0.5


@pytest.mark.parametrize(
    ("name", "channels"), [("efficientnet_lite0", [40, 112]), ("efficientnet_lite2", [48, 120])]
)
def test_lite_feature_shapes_and_weights(name, channels):
    backbone = build_backbone(name)
    assert isinstance(backbone, FeatureBackbone)
    assert backbone.name == name
    assert backbone.channels == channels
    assert backbone.strides == [8, 16]
    # timm's EfficientNetFeatures keeps all blocks; ours stops after the last needed stage.
    assert len(backbone.model.blocks) == 5
    with torch.inference_mode():
        feats = backbone(backbone.normalize(torch.rand(1, 3, 256, 256)))
    assert [tuple(f.shape[1:]) for f in feats] == [(channels[0], 32, 32), (channels[1], 16, 16)]
    # Same weights as the classifier.
    classifier_state = build_imagenet_classifier(name).state_dict()
    for key, value in backbone.model.state_dict().items():
        assert torch.equal(value, classifier_state[key]), key


def test_lite_normalisation_matches_tf_preprocessing():
    backbone = build_backbone("efficientnet_lite0")
    x = torch.rand(2, 3, 8, 8)
    assert torch.allclose(backbone.normalize(x), (x * 255 - 127) / 128, atol=1e-5)


def test_backbone_is_frozen_and_stays_in_eval():
    backbone = build_backbone("resnet18", pretrained=False)
    assert all(not p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert not backbone.training
    assert not any(m.training for m in backbone.modules())
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        first = backbone(backbone.normalize(x))
        second = backbone(backbone.normalize(x))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_resnet18_random_weights_shapes(caplog):
    with caplog.at_level("WARNING"):
        backbone = build_backbone("resnet18", pretrained=False)
    assert "RANDOM" in caplog.text
    assert backbone.mean == pytest.approx((0.485, 0.456, 0.406))
    assert backbone.channels == [128, 256]
    assert backbone.strides == [8, 16]
    with torch.inference_mode():
        feats = backbone(backbone.normalize(torch.rand(1, 3, 256, 256)))
    assert [tuple(f.shape[1:]) for f in feats] == [(128, 32, 32), (256, 16, 16)]


def test_wide_resnet_without_weights_raises_helpful_error(offline_empty_caches):
    with pytest.raises(BackboneWeightsUnavailable) as info:
        build_backbone("wide_resnet50_2")
    message = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert "wide_resnet50_2" in message
    assert str(offline_empty_caches) in message  # names where it looked
    assert "weights_path" in message
    assert "efficientnet_lite0" in message
    assert "pretrained: false" in message


def test_weights_path_round_trip_safetensors(tmp_path, offline_empty_caches):
    source = build_imagenet_classifier("resnet18", pretrained=False)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    path = tmp_path / "resnet18.safetensors"
    save_file(state, str(path))

    classifier = build_imagenet_classifier("resnet18", weights_path=path)
    for key, value in classifier.state_dict().items():
        assert torch.equal(value, state[key]), key

    backbone = build_backbone("resnet18", weights_path=path)
    for key, value in backbone.model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_weights_path_torch_file_without_head(tmp_path):
    source = build_imagenet_classifier("resnet18", pretrained=False)
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    path = tmp_path / "resnet18_headless.pth"
    torch.save({"state_dict": state}, path)
    backbone = build_backbone("resnet18", weights_path=path)
    for key, value in backbone.model.state_dict().items():
        assert torch.equal(value, state[key]), key


def _with_running_statistics(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, eval mode."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            channels = module.num_features
            module.running_mean.copy_(torch.randn(channels, generator=generator))
            module.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
            module.weight.data.copy_(torch.randn(channels, generator=generator))
            module.bias.data.copy_(torch.randn(channels, generator=generator))
    return model.eval()


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet18"])
def test_folded_batch_norms_give_the_same_features(name):
    backbone = build_backbone(name, pretrained=False)
    _with_running_statistics(backbone.model)
    batch_norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())
    x = backbone.normalize(torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(1)))
    with torch.inference_mode():
        before = backbone(x)
    assert backbone.fold_batch_norms() == batch_norms > 0
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())
    assert all(not p.requires_grad for p in backbone.parameters())
    with torch.inference_mode():
        after = backbone(x)
    for expected, actual in zip(before, after, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_folding_keeps_the_activation_of_a_timm_batchnorm_act():
    timm_layers = pytest.importorskip("timm.layers")
    block = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1, bias=False),
                                timm_layers.BatchNormAct2d(4, act_layer=torch.nn.ReLU6))
    _with_running_statistics(block)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 4
    with torch.no_grad():
        before = block(x)
        assert fold_conv_batch_norms(block) == 1
        after = block(x)
    assert isinstance(block[1], torch.nn.ReLU6)
    assert float(before.max()) <= 6.0 and float(before.min()) >= 0.0
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


class _BatchNormRegisteredBeforeUse(torch.nn.Module):
    """A conv then a BatchNorm in registration order, but the BatchNorm runs first."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1)
        self.bn = torch.nn.BatchNorm2d(3)

    def forward(self, x):
        return [self.conv(self.bn(x))]


def test_folding_that_would_change_the_features_is_undone(caplog):
    model = _with_running_statistics(_BatchNormRegisteredBeforeUse())
    backbone = FeatureBackbone(model, name="odd", channels=[3], strides=[1], mean=(0.0,) * 3, std=(1.0,) * 3)
    x = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        before = backbone(x)[0]
    with caplog.at_level("WARNING"):
        assert backbone.fold_batch_norms() == 0
    assert "kept the unfolded network" in caplog.text
    assert isinstance(backbone.model.bn, torch.nn.BatchNorm2d)
    with torch.inference_mode():
        assert torch.equal(backbone(x)[0], before)
