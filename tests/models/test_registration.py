"""Tests for the STN + Siamese registration encoder (fsad_pipeline.models.registration)."""

from __future__ import annotations

import math

import pytest
import torch

from fsad_pipeline.models.backbones import FeatureBackbone, build_backbone
from fsad_pipeline.models.features import PatchFeatureExtractor
from fsad_pipeline.models.registration import (
    ChannelAttention,
    EncoderConfig,
    SpatialTransformer,
    STNConfig,
    build_registration_encoder,
    compose,
    identity_theta,
    invert,
    read_encoder_info,
    rotation_scale_theta,
    save_encoder,
    siamese_loss,
    split_stages,
    warp,
)


def _smooth_maps(batch: int = 2, channels: int = 3, size: int = 48) -> torch.Tensor:
    """Low-frequency maps, so bilinear resampling is nearly exact."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    maps = [torch.sin(2.0 * xx + c) * torch.cos(1.5 * yy - c) + 0.3 * xx * yy for c in range(batch * channels)]
    return torch.stack(maps).view(batch, channels, size, size)


def _rotation(angle_deg: float, scale: float = 1.0, batch: int = 2) -> torch.Tensor:
    angle = math.radians(angle_deg)
    return rotation_scale_theta(torch.tensor([[angle, scale, scale]] * batch))


@pytest.mark.parametrize("mode", ["rotation_scale", "affine"])
def test_stn_at_identity_initialisation_returns_its_input(mode):
    torch.manual_seed(0)
    stn = SpatialTransformer(8, STNConfig(mode=mode)).eval()
    features = torch.randn(3, 8, 20, 20)
    warped, theta = stn(features)
    torch.testing.assert_close(theta, identity_theta(3))
    torch.testing.assert_close(warped, features, atol=1e-5, rtol=0)


def test_inverse_warp_undoes_the_forward_warp_up_to_the_borders():
    maps = _smooth_maps()
    theta = _rotation(25.0, 0.9)
    restored = warp(warp(maps, theta), invert(theta))
    centre = (slice(None), slice(None), slice(12, 36), slice(12, 36))
    assert (restored - maps)[centre].abs().max() < 0.02
    assert (warp(maps, theta) - maps)[centre].abs().max() > 0.2  # the warp did move things
    torch.testing.assert_close(compose(theta, invert(theta)), identity_theta(2), atol=1e-6, rtol=0)


def test_composed_transform_equals_warping_twice():
    maps = _smooth_maps()
    first, second = _rotation(15.0), _rotation(-30.0, 1.1)
    twice = warp(warp(maps, first), second)
    once = warp(maps, compose(first, second))
    centre = (slice(None), slice(None), slice(14, 34), slice(14, 34))
    assert (twice - once)[centre].abs().max() < 0.02


def test_reflection_padding_never_leaves_black_borders():
    maps = torch.ones(1, 1, 16, 16) + 0.1 * _smooth_maps(1, 1, 16)
    warped = warp(maps, _rotation(45.0, 0.6, batch=1))
    assert warped.min() > 0.5  # zero padding would put ~0 in the corners


def test_rotation_scale_matrix_is_regads():
    theta = rotation_scale_theta(torch.tensor([[math.pi / 2, 2.0, 3.0]]))
    expected = torch.tensor([[[0.0, -1.0, 0.0], [1.0, 0.0, 0.0]]])
    torch.testing.assert_close(theta, expected, atol=1e-6, rtol=0)


def test_siamese_loss_on_hand_made_inputs():
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0]]).T.reshape(1, 2, 1, 2)  # two positions
    same = siamese_loss(z.clone(), z, z.clone(), z)
    assert same.item() == pytest.approx(-1.0)
    assert siamese_loss(-z, z, -z, z).item() == pytest.approx(1.0)
    orthogonal = torch.tensor([[0.0, 1.0], [-1.0, 0.0]]).T.reshape(1, 2, 1, 2)
    assert siamese_loss(orthogonal, z, orthogonal, z).item() == pytest.approx(0.0, abs=1e-7)
    # Half aligned, half opposite: the two symmetric terms average.
    assert siamese_loss(z, z, -z, z).item() == pytest.approx(0.0, abs=1e-7)


def test_siamese_loss_stops_the_gradient_on_the_projections():
    p1 = torch.randn(2, 4, 3, 3, requires_grad=True)
    p2 = torch.randn(2, 4, 3, 3, requires_grad=True)
    z1 = torch.randn(2, 4, 3, 3, requires_grad=True)
    z2 = torch.randn(2, 4, 3, 3, requires_grad=True)
    siamese_loss(p1, z1, p2, z2).backward()
    assert z1.grad is None and z2.grad is None
    assert p1.grad.abs().sum() > 0 and p2.grad.abs().sum() > 0


def test_channel_attention_starts_as_identity():
    attention = ChannelAttention(12).eval()
    features = torch.randn(2, 12, 5, 5)
    torch.testing.assert_close(attention(features), features)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet18"])
def test_split_stages_reproduces_the_backbone(name):
    backbone = build_backbone(name, pretrained=False, out_indices=(0, 1, 2, 3))
    stages = split_stages(backbone.model)
    x = torch.randn(1, 3, 64, 64)
    expected = backbone(x)
    outputs = []
    with torch.no_grad():
        h = x
        for stage in stages:
            h = stage(h)
            outputs.append(h)
    assert len(outputs) == 4
    for got, want in zip(outputs, expected, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("attention", [False, True])
def test_untrained_encoder_computes_the_plain_backbone_features(attention):
    encoder, _ = build_registration_encoder(EncoderConfig(attention=attention))
    plain = build_backbone("efficientnet_lite0")
    x = plain.normalize(torch.rand(2, 3, 64, 64))
    with torch.no_grad():
        got = encoder.eval()(x)
    want = plain(x)
    assert encoder.channels == plain.channels and encoder.strides == plain.strides
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


def test_registered_encoder_round_trips_through_the_backbone_factory(tmp_path, monkeypatch):
    torch.manual_seed(0)
    encoder, base = build_registration_encoder(EncoderConfig(stn=STNConfig(stages=(1, 2))), pretrained=False)
    with torch.no_grad():  # a non-identity registration, so the inverse warp matters
        encoder.stns["1"].head.bias.copy_(torch.tensor([0.3, 1.1, 0.9]))
        encoder.stns["2"].head.weight.normal_(0, 0.01)
    encoder.eval()
    registry = tmp_path / "encoders"
    save_encoder(registry / "mine", encoder, name="mine", mean=base.mean, std=base.std, image_size=64,
                 training={"epochs": 1})
    monkeypatch.setenv("FSAD_ENCODER_REGISTRY", str(registry))
    loaded = build_backbone("registered:mine")
    assert isinstance(loaded, FeatureBackbone) and loaded.name == "registered:mine"
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(loaded(x), encoder(x), strict=True):
            torch.testing.assert_close(a, b)
    # A folder path works too, and the memory-bank feature extractor takes it like any backbone.
    by_path = build_backbone(f"registered:{registry / 'mine'}")
    extractor = PatchFeatureExtractor(by_path, pretrain_dim=32, target_dim=32)
    assert extractor(torch.rand(1, 3, 64, 64)).shape == (1, 32, 8, 8)
    low, high = extractor.dual_path(torch.rand(2, 3, 64, 64))  # DFD's two frequency paths
    assert low.shape == high.shape == (2, 32, 8, 8)
    info = read_encoder_info("registered:mine")
    assert info["base_backbone"] == "efficientnet_lite0" and info["image_size"] == 64
    assert info["encoder"]["stn"]["stages"] == [1, 2] and info["training"] == {"epochs": 1}
    with pytest.raises(FileNotFoundError, match="mine"):
        build_backbone("registered:missing")
