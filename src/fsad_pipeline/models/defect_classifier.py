"""Few-shot defect-type classifier on memory-bank residuals (methods.md §12, done properly).

The pieces, each usable on its own:

* :func:`residual_features` — each patch feature minus its nearest neighbour in the normal
  memory bank, kept as an (N, C, H, W) map; :func:`paired_residuals` — a synthetic defect
  minus its own clean source (pretraining).
* :class:`ResidualEncoder` — 1×1 convs over the residual map, pooling over positions, a small
  linear head, L2-normalised embedding (the reference flattens 784·1024 values into a
  800k-wide linear layer instead).
* :func:`info_nce_loss`, :func:`pretrain` (episodes over pseudo defect classes),
  :func:`fine_tune` (anchor/positive pairs of the labelled defect shots).
* :class:`PrototypeClassifier` — class prototypes in embedding space, softmax(cos/T)
  probabilities, runner-up, and an open-set ``unknown`` rule calibrated by leave-one-out.
* :class:`PooledEmbedder` — the parameter-free baselines (pooled residuals, pooled features)
  behind the same classifier interface.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from .memory_bank import MemoryBankScorer, NearestNeighbourIndex

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS_FILENAME = "classifier.safetensors"
CONFIG_FILENAME = "classifier.json"
POOLINGS = ("mean", "max", "meanmax")
INPUT_KINDS = ("residual", "features")
UNKNOWN = "unknown"
DEFAULT_TEMPERATURE = 0.07


# --------------------------------------------------------------------------------------------
# Residual features
# --------------------------------------------------------------------------------------------
def _as_index(bank: NearestNeighbourIndex | MemoryBankScorer | Tensor | np.ndarray) -> NearestNeighbourIndex:
    if isinstance(bank, NearestNeighbourIndex):
        if bank.bank is None:
            raise RuntimeError("the nearest-neighbour index is not built")
        return bank
    if isinstance(bank, MemoryBankScorer):
        if bank.index is None:
            raise RuntimeError("the memory bank scorer is not fitted")
        return bank.index
    return NearestNeighbourIndex().build(bank)


def residual_features(
    features: Tensor,
    bank: NearestNeighbourIndex | MemoryBankScorer | Tensor | np.ndarray,
    *,
    images_per_chunk: int = 32,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Each patch feature minus its nearest bank vector, as an (N, C, H, W) CPU tensor.

    ``bank`` is a built :class:`NearestNeighbourIndex`, a fitted :class:`MemoryBankScorer`
    (its index is reused) or an (M, C) matrix (indexed here). The patches are laid out
    patch-major as ``(N·H·W, C)`` rows for the search and put back with ``reshape(N, H, W, C)``
    followed by a permute to ``(N, C, H, W)``. The reference instead reshapes the flat
    patch-major vector straight to ``(C, H, W)``, which interleaves channels and positions, so
    its 1×1 convolutions mix unrelated numbers.
    """
    if features.dim() != 4:
        raise ValueError(f"expected (N, C, H, W) features, got shape {tuple(features.shape)}")
    index = _as_index(bank)
    count, channels, height, width = features.shape
    if channels != index.dim:
        raise ValueError(f"feature dim {channels} != bank dim {index.dim}")
    bank_rows = torch.from_numpy(index.bank)
    out = torch.empty(count, channels, height, width, dtype=dtype)
    for start in range(0, count, max(1, int(images_per_chunk))):
        chunk = features[start : start + images_per_chunk].detach().float().cpu()
        patches = chunk.permute(0, 2, 3, 1).reshape(-1, channels)
        _, nearest = index.search(patches, k=1)
        residual = patches - bank_rows[nearest[:, 0]]
        out[start : start + chunk.shape[0]] = residual.reshape(chunk.shape[0], height, width, channels).permute(0, 3, 1, 2).to(dtype)
    return out


def paired_residuals(features: Tensor, source_features: Tensor, source_index: Sequence[int] | Tensor | None = None) -> Tensor:
    """Synthetic features minus the features of their own clean source image (pretraining).

    ``source_features`` is either aligned with ``features`` row for row, or holds the support
    images and ``source_index[i]`` names the row that sample ``i`` was pasted on.
    """
    if source_index is not None:
        index = torch.as_tensor(np.asarray(source_index), dtype=torch.long)
        if index.shape != (features.shape[0],):
            raise ValueError(f"source_index must have {features.shape[0]} entries, got {tuple(index.shape)}")
        source_features = source_features[index]
    if source_features.shape != features.shape:
        raise ValueError(f"shape mismatch: {tuple(features.shape)} vs sources {tuple(source_features.shape)}")
    return features.float() - source_features.float()


# --------------------------------------------------------------------------------------------
# Embedders
# --------------------------------------------------------------------------------------------
def pool_positions(maps: Tensor, pooling: str) -> Tensor:
    """(N, C, H, W) → (N, C) mean, (N, C) max or (N, 2C) mean ‖ max over positions."""
    flat = maps.flatten(2)
    if pooling == "mean":
        return flat.mean(dim=2)
    if pooling == "max":
        return flat.amax(dim=2)
    if pooling == "meanmax":
        return torch.cat([flat.mean(dim=2), flat.amax(dim=2)], dim=1)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


class ResidualEncoder(nn.Module):
    """1×1 conv stack → pooling over positions → linear → L2-normalised embedding.

    The 1×1 convolutions treat every position alike, so the embedding does not depend on
    *where* a defect sits; the pooling (mean and max by default) keeps both how much of the
    image is affected and how strong the strongest response is. The head is a
    ``pooled → embed_dim`` linear layer instead of the reference's 100 352-wide one, and it has
    no ReLU after it (a ReLU before L2 normalisation confines embeddings to one orthant).
    ``input_pool`` average-pools the residual map first (k×k cells): the convolutions then
    cost k² times less, which decides the CPU training time, while a defect covering 10–40 %
    of the image still spans many cells.
    """

    kind = "encoder"

    def __init__(
        self,
        in_channels: int,
        *,
        hidden_channels: Sequence[int] = (256, 128),
        embed_dim: int = 128,
        pooling: str = "meanmax",
        input_pool: int = 1,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if input_pool < 1:
            raise ValueError(f"input_pool must be >= 1, got {input_pool}")
        self.input_pool = int(input_pool)
        self.in_channels = int(in_channels)
        self.hidden_channels = tuple(int(width) for width in hidden_channels)
        self.embed_dim = int(embed_dim)
        self.pooling = pooling
        layers: list[nn.Module] = []
        previous = self.in_channels
        for width in self.hidden_channels:
            layers += [nn.Conv2d(previous, width, kernel_size=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            previous = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(previous * (2 if pooling == "meanmax" else 1), self.embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal convolutions and head (as the reference), unit/zero BatchNorm."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.kaiming_normal_(module.weight, nonlinearity="linear")
                nn.init.zeros_(module.bias)

    def config(self) -> dict[str, Any]:
        return {
            "in_channels": self.in_channels,
            "hidden_channels": list(self.hidden_channels),
            "embed_dim": self.embed_dim,
            "pooling": self.pooling,
            "input_pool": self.input_pool,
        }

    def forward(self, residuals: Tensor) -> Tensor:
        """(N, C, H, W) residual maps → (N, embed_dim) unit vectors."""
        residuals = residuals.float()
        if self.input_pool > 1:
            residuals = F.avg_pool2d(residuals, self.input_pool, ceil_mode=True)
        pooled = pool_positions(self.body(residuals), self.pooling)
        return F.normalize(self.head(pooled), dim=1)


class PooledEmbedder(nn.Module):
    """Parameter-free baseline embedding: pooled maps, L2-normalised."""

    kind = "pooled"

    def __init__(self, *, pooling: str = "meanmax") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.pooling = pooling

    def config(self) -> dict[str, Any]:
        return {"pooling": self.pooling}

    def forward(self, maps: Tensor) -> Tensor:
        return F.normalize(pool_positions(maps.float(), self.pooling), dim=1)


EMBEDDERS: dict[str, type[nn.Module]] = {ResidualEncoder.kind: ResidualEncoder, PooledEmbedder.kind: PooledEmbedder}


def _embed(embedder: nn.Module, inputs: Tensor, *, batch_size: int = 64, device: str | torch.device = "cpu") -> Tensor:
    """Embeddings of ``inputs`` in eval mode, batched, returned on CPU."""
    was_training = embedder.training
    embedder.eval().to(device)
    chunks = []
    with torch.inference_mode():
        for start in range(0, inputs.shape[0], max(1, int(batch_size))):
            chunks.append(embedder(inputs[start : start + batch_size].to(device)).float().cpu())
    embedder.train(was_training)
    if not chunks:
        return torch.empty(0, 0)
    return torch.cat(chunks)


# --------------------------------------------------------------------------------------------
# Losses and training
# --------------------------------------------------------------------------------------------
def info_nce_loss(queries: Tensor, keys: Tensor, labels: Tensor, temperature: float = DEFAULT_TEMPERATURE) -> Tensor:
    """Cross-entropy over ``cos(query, key) / T`` with ``labels[i]`` = the row of query i's key.

    Keys are one vector (or prototype) per class; both sides are L2-normalised here.
    """
    logits = F.normalize(queries, dim=1) @ F.normalize(keys, dim=1).T / float(temperature)
    return F.cross_entropy(logits, labels.long())


def class_prototypes(embeddings: Tensor, labels: Tensor, n_classes: int) -> Tensor:
    """Per-class mean of L2-normalised embeddings, re-normalised; (n_classes, D)."""
    embeddings = F.normalize(embeddings, dim=1)
    one_hot = F.one_hot(labels.long(), n_classes).to(embeddings.dtype)  # (N, K)
    sums = one_hot.T @ embeddings
    return F.normalize(sums / one_hot.sum(dim=0).clamp_min(1.0).unsqueeze(1), dim=1)


@dataclass
class PretrainConfig:
    """Episodic pretraining on pseudo defect classes (reference values where they exist)."""

    n_way: int = 10  # classes per episode (all when fewer exist)
    n_query: int = 9  # queries per episode (the reference's batch size)
    key_shots: int = 1  # samples averaged into each class key (reference: 1)
    lr: float = 1e-4
    max_episodes: int = 1000
    stop_accuracy: float = 0.4  # reference THRESHOLD_STOP
    stop_window: int = 10  # episodes averaged by the stop rule (reference: 1)
    temperature: float = DEFAULT_TEMPERATURE
    seed: int = 0

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> PretrainConfig:
        data = data or {}
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass
class TrainResult:
    """What a training run did: steps, whether it stopped early, seconds, per-step history."""

    steps: int = 0
    stopped_early: bool = False
    skipped: bool = False
    seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "history"}


def _class_rows(labels: np.ndarray) -> dict[int, np.ndarray]:
    return {int(c): np.flatnonzero(labels == c) for c in np.unique(labels)}


def pretrain(
    encoder: nn.Module,
    residuals: Tensor,
    labels: Sequence[int] | np.ndarray | Tensor,
    config: PretrainConfig | None = None,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> TrainResult:
    """Episodic InfoNCE pretraining on pseudo defect classes; trains ``encoder`` in place.

    Each episode draws ``n_way`` classes, builds each class key from ``key_shots`` of its
    samples (mean embedding) and ``n_query`` queries from the *other* samples of those classes,
    and takes one Adam step on :func:`info_nce_loss`. Keys and queries go through the encoder
    in one batch, so BatchNorm sees one batch and the keys receive gradients (prototypical
    networks; the reference detaches them).

    Stop rule: the mean query accuracy of the last ``stop_window`` episodes exceeds
    ``stop_accuracy``. The reference stops on the first *single* batch above 0.4; with 9
    queries that accuracy moves in steps of 1/9 with a binomial spread of about ±0.16, so a
    lucky batch stops training almost at random. Averaging over 10 episodes (90 queries)
    brings the spread to about ±0.05.
    """
    config = config or PretrainConfig()
    label_array = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels, dtype=np.int64)
    if residuals.shape[0] != label_array.shape[0]:
        raise ValueError(f"{residuals.shape[0]} residuals for {label_array.shape[0]} labels")
    rows_by_class = {c: rows for c, rows in _class_rows(label_array).items() if rows.size > config.key_shots}
    if len(rows_by_class) < 2:
        raise ValueError(f"pretraining needs >= 2 classes with more than {config.key_shots} samples each")
    classes = np.array(sorted(rows_by_class))
    n_way = min(int(config.n_way), classes.size)
    rng = np.random.default_rng([int(config.seed), 31])
    torch.manual_seed(int(config.seed))
    encoder.to(device).train()
    optimizer = torch.optim.Adam(encoder.parameters(), lr=float(config.lr))
    result = TrainResult()
    recent: list[float] = []
    started = time.perf_counter()
    bar = tqdm(range(int(config.max_episodes)), desc="pretrain (episodes)", disable=not progress)
    for episode in bar:
        chosen = rng.choice(classes, size=n_way, replace=False)
        key_rows, pool_rows, pool_labels = [], [], []
        for position, cls in enumerate(chosen):
            rows = rng.permutation(rows_by_class[int(cls)])
            key_rows.append(rows[: config.key_shots])
            pool_rows.append(rows[config.key_shots :])
            pool_labels.append(np.full(rows.size - config.key_shots, position))
        pool = np.concatenate(pool_rows)
        pick = rng.choice(pool.size, size=min(int(config.n_query), pool.size), replace=False)
        query_rows, query_labels = pool[pick], np.concatenate(pool_labels)[pick]
        batch_rows = np.concatenate([np.concatenate(key_rows), query_rows])
        embeddings = encoder(residuals[torch.from_numpy(batch_rows)].to(device))
        n_keys = n_way * config.key_shots
        keys = F.normalize(embeddings[:n_keys].reshape(n_way, config.key_shots, -1).mean(dim=1), dim=1)
        queries = embeddings[n_keys:]
        targets = torch.from_numpy(query_labels).to(device)
        loss = info_nce_loss(queries, keys, targets, config.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            accuracy = float((queries @ keys.T).argmax(dim=1).eq(targets).float().mean())
        recent = (recent + [accuracy])[-int(config.stop_window) :]
        smoothed = float(np.mean(recent))
        result.history.append({"episode": episode, "loss": float(loss.detach()), "accuracy": accuracy, "smoothed_accuracy": smoothed})
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}", acc=f"{smoothed:.2f}")
        result.steps = episode + 1
        if len(recent) >= int(config.stop_window) and smoothed > float(config.stop_accuracy):
            result.stopped_early = True
            break
    bar.close()
    encoder.eval()
    result.seconds = time.perf_counter() - started
    logger.info(
        "pretraining: %d episodes in %.1f s (%s), smoothed accuracy %.2f",
        result.steps, result.seconds, "early stop" if result.stopped_early else "episode limit",
        result.history[-1]["smoothed_accuracy"] if result.history else float("nan"),
    )
    return result


def _freeze_batchnorm(module: nn.Module) -> None:
    for child in module.modules():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            child.eval()


def fine_tune(
    encoder: nn.Module,
    residuals: Tensor,
    labels: Sequence[int] | np.ndarray | Tensor,
    *,
    epochs: int = 45,
    lr: float = 1e-4,
    temperature: float = DEFAULT_TEMPERATURE,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> TrainResult:
    """Contrastive fine-tuning on the labelled defect shots; trains ``encoder`` in place.

    For every anchor ``j`` of class ``i`` and every other shot ``l`` of class ``i``: keys =
    ``[l]`` + one random shot of each other class, InfoNCE with target 0, one Adam step (the
    reference recipe, 45 epochs). BatchNorm stays in eval mode: its running statistics come from
    pretraining, and batches of a handful of shots would overwrite them with noise. With one
    shot per type there is no positive pair, so nothing is trained (``skipped``) and the
    classifier relies on prototypes alone.
    """
    label_array = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels, dtype=np.int64)
    rows_by_class = _class_rows(label_array)
    pairs = [(int(a), int(p), c) for c, rows in rows_by_class.items() for a in rows for p in rows if a != p]
    result = TrainResult()
    if not pairs or len(rows_by_class) < 2:
        result.skipped = True
        logger.info("fine-tuning skipped: %s", "no class has two shots (no positive pair)" if not pairs else "one class only")
        return result
    rng = np.random.default_rng([int(seed), 37])
    torch.manual_seed(int(seed))
    encoder.to(device).train()
    _freeze_batchnorm(encoder)
    optimizer = torch.optim.Adam(encoder.parameters(), lr=float(lr))
    target = torch.zeros(1, dtype=torch.long, device=device)
    started = time.perf_counter()
    for epoch in tqdm(range(int(epochs)), desc="fine-tune (epochs)", disable=not progress):
        losses = []
        for anchor, positive, cls in pairs:
            negatives = [int(rng.choice(rows)) for other, rows in rows_by_class.items() if other != cls]
            batch = torch.from_numpy(np.array([anchor, positive, *negatives]))
            embeddings = encoder(residuals[batch].to(device))
            loss = info_nce_loss(embeddings[:1], embeddings[1:], target, temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            result.steps += 1
        result.history.append({"epoch": epoch, "loss": float(np.mean(losses))})
    encoder.eval()
    result.seconds = time.perf_counter() - started
    return result


# --------------------------------------------------------------------------------------------
# Prototype classifier with an open-set rule
# --------------------------------------------------------------------------------------------
def calibrate_unknown_threshold(embeddings: Tensor, labels: Sequence[int] | np.ndarray) -> tuple[float | None, dict[str, Any]]:
    """Cosine threshold below which a query is ``unknown``, by leave-one-out on the shots.

    Two kinds of held-out similarities are measured on the support embeddings:

    * genuine ``g`` (classes with >= 2 shots): a shot against its own class prototype built
      *without* it — how close an unseen image of a known type comes to its prototype;
    * class-out ``u`` (>= 2 classes): a shot against the best prototype of the *other* classes,
      i.e. with its whole class left out — how close an image of a type the classifier has
      never seen comes to the known prototypes. This is exactly the open-set situation.

    Rule: with both, ``τ = min(min g, (mean g + mean u) / 2)`` — halfway between the two
    populations, but never above a held-out genuine shot (rejecting a known type costs
    accuracy); when ``mean g <= mean u`` the embedding does not separate them and the rule is
    off (``None``). With one shot per class (no ``g``), ``τ = min u``: a query must be farther
    from every known type than the closest pair of known types are from each other (for two
    classes: below their mutual cosine). With one class and >= 2 shots, ``τ = min g``.
    """
    embeddings = F.normalize(embeddings.float(), dim=1)
    label_array = np.asarray(labels, dtype=np.int64)
    classes = np.unique(label_array)
    n_classes = int(classes.size)
    index_of = {int(c): i for i, c in enumerate(classes)}
    dense = torch.tensor([index_of[int(c)] for c in label_array], dtype=torch.long)
    prototypes = class_prototypes(embeddings, dense, n_classes)
    sums = F.one_hot(dense, n_classes).float().T @ embeddings
    counts = torch.bincount(dense, minlength=n_classes)
    genuine, class_out = [], []
    for row in range(embeddings.shape[0]):
        own = int(dense[row])
        if counts[own] >= 2:
            held_out = F.normalize(sums[own] - embeddings[row], dim=0)
            genuine.append(float(embeddings[row] @ held_out))
        if n_classes >= 2:
            others = torch.cat([prototypes[:own], prototypes[own + 1 :]])
            class_out.append(float((others @ embeddings[row]).max()))
    info: dict[str, Any] = {"genuine": genuine, "class_out": class_out}
    threshold: float | None
    if genuine and class_out:
        mean_g, mean_u = float(np.mean(genuine)), float(np.mean(class_out))
        threshold = min(float(np.min(genuine)), 0.5 * (mean_g + mean_u)) if mean_g > mean_u else None
        info["rule"] = "min(min genuine, midpoint of means)" if threshold is not None else "off: genuine <= class-out"
    elif class_out:
        threshold = float(np.min(class_out))
        info["rule"] = "min class-out (one shot per class)"
    elif genuine:
        threshold = float(np.min(genuine))
        info["rule"] = "min genuine (one class)"
    else:
        threshold = None
        info["rule"] = "off: one shot of one class"
    return threshold, info


@dataclass
class ClassPrediction:
    """Per-image outputs of :meth:`PrototypeClassifier.predict`."""

    class_names: list[str]
    probabilities: np.ndarray  # (N, K) softmax(cos / T)
    cosine: np.ndarray  # (N, K)
    pred_type: list[str]  # argmax type, or "unknown"
    pred_probability: np.ndarray  # (N,) probability of the argmax type
    runner_up: list[str]  # second most likely type ("" with one class)
    is_unknown: np.ndarray  # (N,) bool

    @property
    def closed_set_type(self) -> list[str]:
        """The argmax type, ignoring the unknown rule."""
        return [self.class_names[i] for i in self.probabilities.argmax(axis=1)] if len(self.class_names) else []

    def columns(self, suffix: str = "") -> dict[str, list]:
        """Per-image CSV columns (the model bundle's names): type, its probability, runner-up.

        ``suffix`` (e.g. ``"_residual_prototype"``) names a baseline's columns.
        """
        return {
            f"pred_defect_type{suffix}": list(self.pred_type),
            f"pred_defect_probability{suffix}": [float(p) for p in self.pred_probability],
            f"runner_up_defect_type{suffix}": list(self.runner_up),
        }


class PrototypeClassifier:
    """Nearest prototype in an embedding space, with probabilities and an ``unknown`` rule.

    Prototypes are the re-normalised mean of the shots' L2-normalised embeddings. The
    reference averages the support *images* in pixel space before embedding them; two
    defects of the same type at different places average into a faint ghost of both, while
    the embedding (pooled over positions) is the same wherever the defect sits, so averaging
    there keeps what the shots have in common.
    """

    def __init__(
        self,
        embedder: nn.Module,
        *,
        input_kind: str = "residual",
        temperature: float = DEFAULT_TEMPERATURE,
        open_set: bool = True,
        unknown_margin: float = 0.0,
        batch_size: int = 64,
        device: str | torch.device = "cpu",
    ) -> None:
        if input_kind not in INPUT_KINDS:
            raise ValueError(f"input_kind must be one of {INPUT_KINDS}, got {input_kind!r}")
        if getattr(embedder, "kind", None) not in EMBEDDERS:
            raise ValueError(f"embedder must be one of {sorted(EMBEDDERS)} (a .kind attribute)")
        self.embedder = embedder
        self.input_kind = input_kind
        self.temperature = float(temperature)
        self.open_set = bool(open_set)
        self.unknown_margin = float(unknown_margin)
        self.batch_size = int(batch_size)
        self.device = device
        self.class_names: list[str] = []
        self.prototypes: Tensor | None = None
        self.unknown_threshold: float | None = None
        self.calibration: dict[str, Any] = {}

    def embed(self, inputs: Tensor) -> Tensor:
        return _embed(self.embedder, inputs, batch_size=self.batch_size, device=self.device)

    def fit(self, inputs: Tensor, labels: Sequence[str]) -> PrototypeClassifier:
        """Prototypes of the labelled shots and the leave-one-out ``unknown`` threshold."""
        labels = [str(label) for label in labels]
        if inputs.shape[0] != len(labels) or not labels:
            raise ValueError(f"need one label per input, got {inputs.shape[0]} inputs and {len(labels)} labels")
        self.class_names = sorted(set(labels))
        dense = torch.tensor([self.class_names.index(label) for label in labels], dtype=torch.long)
        embeddings = self.embed(inputs)
        self.prototypes = class_prototypes(embeddings, dense, len(self.class_names))
        threshold, self.calibration = calibrate_unknown_threshold(embeddings, dense.numpy())
        self.unknown_threshold = None if threshold is None else threshold - self.unknown_margin
        return self

    def predict(self, inputs: Tensor) -> ClassPrediction:
        if self.prototypes is None:
            raise RuntimeError("predict() before fit()")
        cosine = self.embed(inputs) @ self.prototypes.T if inputs.shape[0] else torch.empty(0, len(self.class_names))
        probabilities = torch.softmax(cosine / self.temperature, dim=1).numpy()
        cosine_np = cosine.numpy()
        order = np.argsort(-probabilities, axis=1, kind="stable")
        best = order[:, 0] if len(order) else np.zeros(0, dtype=np.int64)
        max_cosine = cosine_np[np.arange(len(best)), best] if len(best) else np.zeros(0)
        is_unknown = np.zeros(len(best), dtype=bool)
        if self.open_set and self.unknown_threshold is not None:
            is_unknown = max_cosine < self.unknown_threshold
        pred = [UNKNOWN if flag else self.class_names[i] for i, flag in zip(best, is_unknown)]
        runner = [self.class_names[row[1]] if row.size > 1 else "" for row in order]
        return ClassPrediction(
            class_names=list(self.class_names),
            probabilities=probabilities,
            cosine=cosine_np,
            pred_type=pred,
            pred_probability=probabilities[np.arange(len(best)), best] if len(best) else np.zeros(0),
            runner_up=runner,
            is_unknown=is_unknown,
        )

    # ------------------------------------------------------------------ persistence
    def config(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "embedder": {"kind": self.embedder.kind, **self.embedder.config()},
            "input_kind": self.input_kind,
            "temperature": self.temperature,
            "open_set": self.open_set,
            "unknown_margin": self.unknown_margin,
            "unknown_threshold": self.unknown_threshold,
            "class_names": self.class_names,
            "calibration": self.calibration,
            "batch_size": self.batch_size,
        }

    def save(self, directory: str | Path) -> Path:
        """``classifier.safetensors`` (embedder weights + prototypes) and ``classifier.json``."""
        if self.prototypes is None:
            raise RuntimeError("save() before fit()")
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {f"embedder.{k}": v.detach().cpu().contiguous() for k, v in self.embedder.state_dict().items()}
        tensors["prototypes"] = self.prototypes.contiguous()
        save_file(tensors, str(path / WEIGHTS_FILENAME))
        (path / CONFIG_FILENAME).write_text(json.dumps(self.config(), indent=2), encoding="utf-8")
        return path

    @classmethod
    def load(cls, directory: str | Path, *, device: str | torch.device = "cpu") -> PrototypeClassifier:
        path = Path(directory)
        config = json.loads((path / CONFIG_FILENAME).read_text(encoding="utf-8"))
        if config.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"unsupported classifier format {config.get('format_version')}")
        embedder_config = dict(config["embedder"])
        embedder = EMBEDDERS[embedder_config.pop("kind")](**embedder_config)
        tensors = load_file(str(path / WEIGHTS_FILENAME))
        embedder.load_state_dict({k[len("embedder.") :]: v for k, v in tensors.items() if k.startswith("embedder.")})
        embedder.eval()
        classifier = cls(
            embedder,
            input_kind=config["input_kind"],
            temperature=config["temperature"],
            open_set=config["open_set"],
            unknown_margin=config["unknown_margin"],
            batch_size=config.get("batch_size", 64),
            device=device,
        )
        classifier.class_names = list(config["class_names"])
        classifier.prototypes = tensors["prototypes"]
        classifier.unknown_threshold = config["unknown_threshold"]
        classifier.calibration = config.get("calibration", {})
        return classifier


__all__ = [
    "ClassPrediction",
    "PooledEmbedder",
    "PretrainConfig",
    "PrototypeClassifier",
    "ResidualEncoder",
    "TrainResult",
    "UNKNOWN",
    "calibrate_unknown_threshold",
    "class_prototypes",
    "fine_tune",
    "info_nce_loss",
    "paired_residuals",
    "pool_positions",
    "pretrain",
    "residual_features",
]
