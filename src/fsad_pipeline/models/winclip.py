"""WinCLIP zero-/few-shot anomaly scoring on an open_clip ViT (anomalib's formulation, digest §10).

Zero-shot: compositional prompt ensemble → (normal, anomalous) text embeddings; the whole image and
every k×k window of the patch grid are classified against them, window scores are spread back to
patches by a harmonic mean, and image + window scales are fused by another harmonic mean.
Few-shot: patch tokens and window embeddings of k reference images form a memory; a query entry
scores ``(1 − max cos) / 2`` against it.

No weights are ever downloaded: :func:`load_clip_model` only reads a local checkpoint file.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

NORMAL_STATES: tuple[str, ...] = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
ANOMALOUS_STATES: tuple[str, ...] = (
    "damaged {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)
TEMPLATES: tuple[str, ...] = (
    "a cropped photo of the {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a dark photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a jpeg corrupted photo of the {}.",  # duplicated on purpose, as in the reference
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
)

# Keys of a TorchScript/OpenAI checkpoint that are not parameters.
_NON_PARAMETER_KEYS = ("input_resolution", "context_length", "vocab_size")


class ClipWeightsUnavailable(RuntimeError):
    """Raised when no local CLIP checkpoint is available (the caller skips the WinCLIP scorer)."""


class LoadedClip(NamedTuple):
    """What :func:`load_clip_model` returns; unpacks as ``model, tokenizer, (mean, std), size``."""

    model: nn.Module
    tokenizer: Callable[..., Tensor]
    mean_std: tuple[tuple[float, ...], tuple[float, ...]]
    image_size: tuple[int, int]


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def build_prompts(class_name: str = "object") -> tuple[list[str], list[str]]:
    """Prompt ensemble: every state × every template (147 normal, 84 anomalous prompts)."""
    normal_states = [state.format(class_name) for state in NORMAL_STATES]
    anomalous_states = [state.format(class_name) for state in ANOMALOUS_STATES]
    normal = [template.format(state) for state in normal_states for template in TEMPLATES]
    anomalous = [template.format(state) for state in anomalous_states for template in TEMPLATES]
    return normal, anomalous


# --------------------------------------------------------------------------------------------
# Model loading (local file only)
# --------------------------------------------------------------------------------------------


def _read_state_dict(checkpoint_path: Path) -> dict[str, Tensor]:
    """Read a safetensors / torch file and normalise it to open_clip's key layout."""
    if checkpoint_path.suffix == ".safetensors":
        from safetensors.torch import load_file

        checkpoint: Any = load_file(str(checkpoint_path), device="cpu")
    else:
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    for wrapper_key in ("state_dict", "model"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(wrapper_key), dict):
            checkpoint = checkpoint[wrapper_key]
    state_dict = {}
    for key, value in checkpoint.items():
        if key in _NON_PARAMETER_KEYS:
            continue
        state_dict[key.removeprefix("module.")] = value
    return state_dict


def _adapt_state_dict(model: nn.Module, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map an OpenAI-style (flat text tower) dict onto a custom-text model; fix logit_scale rank."""
    model_keys = model.state_dict()
    if "text_projection" in state_dict and "text_projection" not in model_keys:
        text_prefixes = ("text_projection", "positional_embedding", "token_embedding", "transformer", "ln_final")
        state_dict = {
            (f"text.{key}" if key.startswith(text_prefixes) else key): value for key, value in state_dict.items()
        }
    for scalar_key in ("logit_scale", "logit_bias"):
        if scalar_key in state_dict and scalar_key in model_keys:
            state_dict[scalar_key] = state_dict[scalar_key].reshape(model_keys[scalar_key].shape)
    return state_dict


def load_clip_model(
    model_name: str = "ViT-B-16-plus-240",
    checkpoint_path: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
) -> LoadedClip:
    """Build an open_clip architecture without downloading and load a LOCAL checkpoint into it.

    Args:
        model_name: open_clip architecture name (WinCLIP uses ``ViT-B-16-plus-240``).
        checkpoint_path: local ``.safetensors`` / ``.pt`` / ``.bin`` file (open_clip- or OpenAI-style keys,
            optionally wrapped in ``state_dict`` and/or prefixed with ``module.``).
        device: where the model is placed.

    Raises:
        ClipWeightsUnavailable: ``checkpoint_path`` is None or does not exist.
    """
    if checkpoint_path is None:
        raise ClipWeightsUnavailable(
            f"No CLIP checkpoint configured for {model_name!r}; WinCLIP needs a local weights file "
            "(e.g. open_clip 'laion400m_e31' weights saved as .safetensors/.pt)."
        )
    path = Path(checkpoint_path)
    if not path.is_file():
        raise ClipWeightsUnavailable(f"CLIP checkpoint for {model_name!r} not found at {str(path)!r}.")

    import open_clip  # deferred: importing open_clip is slow and only this path needs it

    model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=None)
    state_dict = _adapt_state_dict(model, _read_state_dict(path))
    model.load_state_dict(state_dict, strict=True)
    model = model.to(device).eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    mean, std = _preprocess_mean_std(model)
    logger.info("Loaded CLIP %s from %s", model_name, path)
    return LoadedClip(model, tokenizer, (mean, std), _native_image_size(model))


def _preprocess_mean_std(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation constants from the model's open_clip preprocess config, CLIP's by default."""
    visual = getattr(model, "visual", model)
    config = getattr(visual, "preprocess_cfg", None) or {}
    mean = config.get("mean") or getattr(visual, "image_mean", None) or CLIP_MEAN
    std = config.get("std") or getattr(visual, "image_std", None) or CLIP_STD
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _native_image_size(model: nn.Module) -> tuple[int, int]:
    """(height, width) that the visual tower's positional embedding was built for."""
    size = model.visual.image_size
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


# --------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------


def make_window_masks(grid: tuple[int, int], kernel: int, stride: int = 1) -> Tensor:
    """Patch indices (row-major in ``grid``) of every ``kernel×kernel`` window: ``(n_windows, kernel²)``."""
    height, width = grid
    if kernel < 1 or kernel > min(height, width):
        raise ValueError(f"Window size {kernel} does not fit the {height}×{width} patch grid.")
    indices = torch.arange(height * width, dtype=torch.float64).reshape(1, 1, height, width)
    windows = F.unfold(indices, kernel_size=kernel, stride=stride)  # (1, kernel², n_windows)
    return windows[0].T.round().long().contiguous()


def harmonic_aggregation(window_scores: Tensor, masks: Tensor, grid: tuple[int, int]) -> Tensor:
    """Per patch, the harmonic mean of the scores of all windows covering it: ``(B, h, w)``.

    A zero window score makes the mean 0 for every patch it covers; an uncovered patch gets 0.
    """
    height, width = grid
    n_windows = masks.shape[0]
    coverage = torch.zeros(n_windows, height * width, dtype=torch.bool, device=masks.device)
    coverage.scatter_(1, masks, True)
    inverse = 1.0 / window_scores  # (B, n_windows); inf where a score is 0
    # masked sum (not a matmul) so that inf · 0 never turns into NaN for uncovered patches
    inverse_sum = torch.where(coverage.unsqueeze(0), inverse.unsqueeze(-1), 0.0).sum(dim=1)
    counts = coverage.sum(dim=0).to(window_scores.dtype)
    harmonic = (counts / inverse_sum).nan_to_num(nan=0.0, posinf=0.0)
    return harmonic.reshape(window_scores.shape[0], height, width)


def _cosine_similarity(queries: Tensor, keys: Tensor) -> Tensor:
    """Cosine similarity of ``(..., N, D)`` against ``(M, D)`` → ``(..., N, M)``."""
    return F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).T


def class_scores(embeddings: Tensor, text_embeddings: Tensor, temperature: float = 0.07) -> Tensor:
    """Softmax over ``cos(e, t) / temperature`` for each text class: ``(..., n_classes)``."""
    return (_cosine_similarity(embeddings, text_embeddings) / temperature).softmax(dim=-1)


def visual_association_score(embeddings: Tensor, reference: Tensor) -> Tensor:
    """``(1 − max cos) / 2`` of each ``(B, N, D)`` entry to all reference entries ``(..., D)`` → ``(B, N)``."""
    flat_reference = reference.reshape(-1, reference.shape[-1])
    similarity = _cosine_similarity(embeddings, flat_reference)
    return (1.0 - similarity.amax(dim=-1)) / 2.0


# --------------------------------------------------------------------------------------------
# Scorer
# --------------------------------------------------------------------------------------------


class WinClipScorer:
    """WinCLIP zero-shot (+ few-shot after :meth:`fit`) anomaly maps and image scores.

    Args:
        model: open_clip ``CLIP`` with a ``VisionTransformer`` visual tower.
        tokenizer: open_clip tokenizer (``open_clip.get_tokenizer(model_name)``).
        class_name: object name inserted into the prompts (anomalib falls back to ``"object"``).
        image_size: model input size; None = the visual tower's native size (the only size the
            fixed positional embedding supports).
        scales: window sizes in patches (anomalib: 2 and 3).
        temperature: softmax temperature of the class scores.
        device: where the computation runs.
        image_mean / image_std: normalisation; None = the model's preprocess config (CLIP's constants).
        batch_size: images encoded per forward pass in :meth:`score` / :meth:`fit`.
        window_batch_size: window sequences per transformer pass (bounds memory).
    """

    name = "winclip"

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Callable[..., Tensor],
        *,
        class_name: str = "object",
        image_size: int | tuple[int, int] | None = None,
        scales: Sequence[int] = (2, 3),
        temperature: float = 0.07,
        device: str | torch.device = "cpu",
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        batch_size: int = 8,
        window_batch_size: int = 1024,
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.visual = self.model.visual
        self.visual.output_tokens = True  # forward returns (pooled, unprojected patch tokens)
        native_size = _native_image_size(self.model)
        requested = native_size if image_size is None else tuple(np.broadcast_to(image_size, 2).tolist())
        if requested != native_size:
            raise ValueError(f"image_size {requested} differs from the model's native size {native_size}.")
        self.image_size: tuple[int, int] = native_size
        self.grid: tuple[int, int] = tuple(int(g) for g in self.visual.grid_size)  # type: ignore[assignment]
        self.scales = tuple(int(s) for s in scales)
        self.temperature = float(temperature)
        self.batch_size = int(batch_size)
        self.window_batch_size = int(window_batch_size)
        default_mean, default_std = _preprocess_mean_std(self.model)
        mean = default_mean if image_mean is None else image_mean
        std = default_std if image_std is None else image_std
        self._mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.masks = [make_window_masks(self.grid, scale).to(self.device) for scale in self.scales]
        self.class_name = class_name
        self.text_embeddings = self._encode_text(tokenizer, class_name)
        self._reference_patches: Tensor | None = None
        self._reference_windows: list[Tensor] = []

    # ---------------------------------------------------------------- encoding
    @torch.no_grad()
    def _encode_text(self, tokenizer: Callable[..., Tensor], class_name: str) -> Tensor:
        """Mean raw ``encode_text`` output per state: ``(2, D)`` (normal, anomalous), not normalised."""
        embeddings = []
        for prompts in build_prompts(class_name):
            tokens = tokenizer(prompts).to(self.device)
            embeddings.append(self.model.encode_text(tokens).float().mean(dim=0))
        return torch.stack(embeddings)

    def _preprocess(self, images: np.ndarray) -> Tensor:
        """uint8 ``(B, H, W, 3)`` → normalised ``(B, 3, h, w)`` at the model size (bicubic, antialias)."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"Expected uint8 images of shape (B, H, W, 3), got {images.shape}.")
        pixels = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        pixels = pixels.permute(0, 3, 1, 2).float() / 255.0
        if tuple(pixels.shape[-2:]) != self.image_size:
            pixels = F.interpolate(pixels, size=self.image_size, mode="bicubic", antialias=True, align_corners=False)
            pixels = pixels.clamp(0.0, 1.0)  # bicubic overshoot; PIL clips uint8 the same way
        return (pixels - self._mean) / self._std

    def _finish_visual_forward(self, tokens: Tensor) -> Tensor:
        """Run pre-transformer token sequences through ln_pre, transformer, ln_post, pool and proj."""
        hidden = self.visual.ln_pre(self.visual.patch_dropout(tokens))
        hidden = self.visual.transformer(hidden)  # open_clip's Transformer takes batch-first input
        pooled, _ = self.visual._pool(hidden)
        if self.visual.proj is not None:
            pooled = pooled @ self.visual.proj
        return pooled

    def _window_embeddings(self, feature_map: Tensor, masks: Tensor) -> Tensor:
        """Projected embedding of cls + each window's patch tokens: ``(B, n_windows, D)``."""
        batch, _, width = feature_map.shape
        n_windows = masks.shape[0]
        cls_index = torch.zeros(n_windows, 1, dtype=torch.long, device=masks.device)
        token_index = torch.cat([cls_index, masks + 1], dim=1)  # +1 skips the cls token
        sequences = feature_map[:, token_index].reshape(batch * n_windows, token_index.shape[1], width)
        pooled = [
            self._finish_visual_forward(chunk) for chunk in sequences.split(self.window_batch_size, dim=0)
        ]
        return torch.cat(pooled).reshape(batch, n_windows, -1)

    @torch.no_grad()
    def _encode_images(self, pixels: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
        """Image embeddings ``(B, D)``, window embeddings per scale, unprojected patch tokens ``(B, N, W)``."""
        captured: dict[str, Tensor] = {}

        def keep_input(_module: nn.Module, inputs: tuple[Tensor, ...], _output: Any) -> None:
            captured["feature_map"] = inputs[0]  # cls + patches after the positional embedding

        handle = self.visual.patch_dropout.register_forward_hook(keep_input)
        try:
            image_embeddings, patch_tokens = self.visual(pixels)
        finally:
            handle.remove()
        windows = [self._window_embeddings(captured["feature_map"], masks) for masks in self.masks]
        return image_embeddings.float(), [w.float() for w in windows], patch_tokens.float()

    # ---------------------------------------------------------------- scoring
    @property
    def is_fitted(self) -> bool:
        """True once reference images were given to :meth:`fit`."""
        return self._reference_patches is not None

    def fit(self, reference_images: np.ndarray) -> WinClipScorer:
        """Store patch tokens and per-scale window embeddings of the ``(k, H, W, 3)`` reference images."""
        if len(reference_images) == 0:
            raise ValueError("fit() needs at least one reference image.")
        patches, windows = [], []
        for start in range(0, len(reference_images), self.batch_size):
            pixels = self._preprocess(reference_images[start : start + self.batch_size])
            _, window_embeddings, patch_tokens = self._encode_images(pixels)
            patches.append(patch_tokens)
            windows.append(window_embeddings)
        self._reference_patches = torch.cat(patches)
        self._reference_windows = [torch.cat(per_scale) for per_scale in zip(*windows)]
        logger.info("WinCLIP memory: %d reference images", len(reference_images))
        return self

    def _zero_shot(self, image_scores: Tensor, window_embeddings: list[Tensor]) -> Tensor:
        """Harmonic mean of the broadcast image score and every scale's window map: ``(B, h, w)``."""
        maps = [image_scores.view(-1, 1, 1).expand(-1, *self.grid)]
        for embeddings, masks in zip(window_embeddings, self.masks):
            window_scores = class_scores(embeddings, self.text_embeddings, self.temperature)[..., 1]
            maps.append(harmonic_aggregation(window_scores, masks, self.grid))
        return len(maps) / (1.0 / torch.stack(maps)).sum(dim=0)

    def _few_shot(self, patch_tokens: Tensor, window_embeddings: list[Tensor]) -> Tensor:
        """Arithmetic mean of the patch association map and each scale's aggregated window map.

        As in the reference, the patch branch compares UNPROJECTED transformer tokens while the
        window branch compares PROJECTED window embeddings (digest §14 pitfall 9).
        """
        assert self._reference_patches is not None
        patch_map = visual_association_score(patch_tokens, self._reference_patches)
        maps = [patch_map.reshape(-1, *self.grid)]
        for embeddings, reference, masks in zip(window_embeddings, self._reference_windows, self.masks):
            maps.append(harmonic_aggregation(visual_association_score(embeddings, reference), masks, self.grid))
        return torch.stack(maps).mean(dim=0)

    def score(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Anomaly maps ``(B, H, W)`` at the input size and image scores ``(B,)`` for uint8 ``(B, H, W, 3)``."""
        maps, scores = [], []
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size]
            anomaly_map, pred_score = self._score_batch(self._preprocess(batch), tuple(batch.shape[1:3]))
            maps.append(anomaly_map)
            scores.append(pred_score)
        height, width = images.shape[1:3]
        if not maps:
            return {"anomaly_map": np.zeros((0, height, width), np.float32), "pred_score": np.zeros(0, np.float32)}
        return {"anomaly_map": np.concatenate(maps), "pred_score": np.concatenate(scores)}

    @torch.no_grad()
    def _score_batch(self, pixels: Tensor, output_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        image_embeddings, window_embeddings, patch_tokens = self._encode_images(pixels)
        image_scores = class_scores(image_embeddings, self.text_embeddings, self.temperature)[..., 1]
        grid_map = self._zero_shot(image_scores, window_embeddings)
        if self.is_fitted:
            few_shot_map = self._few_shot(patch_tokens, window_embeddings)
            grid_map = (grid_map + few_shot_map) / 2.0
            image_scores = (image_scores + few_shot_map.amax(dim=(-2, -1))) / 2.0
        full_map = F.interpolate(grid_map.unsqueeze(1), size=output_size, mode="bilinear", align_corners=False)
        return full_map[:, 0].cpu().numpy().astype(np.float32), image_scores.cpu().numpy().astype(np.float32)
