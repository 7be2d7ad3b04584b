"""Tests of the DFD modules and losses (tiny dims, CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fsad_pipeline.models.dfd import (
    DFDModel,
    DFDModelConfig,
    FeatureAdaptor,
    GaussianDiscriminator,
    PerlinDiscriminator,
    default_num_heads,
    gaussian_loss,
    linear_norm_act,
    perlin_image_loss,
    perlin_loss,
    perlin_pixel_loss,
    pool_mask_to_grid,
    similarity_loss,
)

DIM = 16
GRID = (4, 4)


def _assert_all_grads(module: torch.nn.Module) -> None:
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None, f"no gradient for {name}"
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, f"zero gradient for {name}"


@pytest.mark.parametrize(
    ("dim", "heads"), [(1536, 16), (384, 4), (256, 2), (16, 1), (100, 1), (1000, 10)]
)
def test_default_num_heads_divides_dim(dim: int, heads: int) -> None:
    assert default_num_heads(dim) == heads
    assert dim % default_num_heads(dim) == 0


def test_feature_adaptor_shapes_and_layouts_agree() -> None:
    torch.manual_seed(0)
    adaptor = FeatureAdaptor(DIM)
    features = torch.randn(2, DIM, *GRID)
    channel_first = adaptor(features)
    assert channel_first.shape == features.shape
    tokens = features.permute(0, 2, 3, 1).reshape(-1, DIM)
    flat = adaptor(tokens)
    assert flat.shape == (2 * GRID[0] * GRID[1], DIM)
    torch.testing.assert_close(channel_first.permute(0, 2, 3, 1).reshape(-1, DIM), flat)
    channel_first.sum().backward()
    _assert_all_grads(adaptor)


def test_gaussian_discriminator_shape_and_grads() -> None:
    torch.manual_seed(0)
    discriminator = GaussianDiscriminator(DIM, hidden=32)
    logits = discriminator(torch.randn(10, DIM))
    assert logits.shape == (10,)
    (logits**2).sum().backward()
    _assert_all_grads(discriminator)
    assert discriminator.tail.bias is None


def test_perlin_discriminator_shape_grads_and_grid_check() -> None:
    torch.manual_seed(0)
    discriminator = PerlinDiscriminator(DIM, GRID, num_heads=2)
    assert discriminator.pos_embed.shape == (1, 1 + GRID[0] * GRID[1], DIM)
    assert discriminator.tail.bias is None
    logits = discriminator(torch.randn(3, DIM, *GRID))
    assert logits.shape == (3, *GRID)
    (logits**2).sum().backward()
    _assert_all_grads(discriminator)
    with pytest.raises(ValueError):
        discriminator(torch.randn(1, DIM, 2, 2))


def test_perlin_discriminator_patch_order_is_row_major() -> None:
    """Position embedding and token order: permuting the input must permute the output alike."""
    torch.manual_seed(0)
    discriminator = PerlinDiscriminator(DIM, GRID).eval()
    discriminator.pos_embed.data.zero_()  # without positions the ViT is permutation-equivariant
    features = torch.randn(1, DIM, *GRID)
    flipped = features.flip(-1)
    torch.testing.assert_close(discriminator(flipped), discriminator(features).flip(-1))


def test_dfd_model_forward_and_patch_scores() -> None:
    torch.manual_seed(0)
    model = DFDModel(DIM, GRID, DFDModelConfig(gaussian_hidden=32))
    low, high = torch.randn(2, DIM, *GRID), torch.randn(2, DIM, *GRID)
    outputs = model(low, high)
    assert set(outputs) == {"perlin_low", "perlin_high", "gaussian_low", "gaussian_high"}
    for value in outputs.values():
        assert value.shape == (2, *GRID)
    sum(value.sum() for value in outputs.values()).backward()
    _assert_all_grads(model)
    model.eval()
    perlin_scores, gaussian_scores = model.patch_scores(low)
    perlin_logits, gaussian_logits = model.path_logits(low)
    torch.testing.assert_close(perlin_scores, -perlin_logits)
    torch.testing.assert_close(gaussian_scores, -gaussian_logits)
    with pytest.raises(ValueError):
        model.patch_scores(torch.randn(1, DIM + 1, *GRID))


def test_gaussian_loss_values() -> None:
    ones = torch.ones(5)
    assert gaussian_loss(ones, -ones).item() == 0.0
    zeros = torch.zeros(5)
    assert gaussian_loss(zeros, zeros).item() == pytest.approx(1.0)  # 2 · 0.5
    assert gaussian_loss(zeros, zeros, margin=0.8).item() == pytest.approx(1.6)
    # Only the violating entries contribute: relu(0.5-0.2)=0.3 averaged over 2 → 0.15.
    loss = gaussian_loss(torch.tensor([0.2, 2.0]), torch.tensor([-3.0, -3.0]))
    assert loss.item() == pytest.approx(0.15)


def test_perlin_loss_with_known_logits() -> None:
    logits = torch.zeros(2, *GRID)
    masks = torch.zeros(2, 16, 16)
    masks[0, :, :8] = 1.0
    labels = torch.tensor([1.0, 0.0])
    upsampled = F.interpolate(logits.unsqueeze(1), size=(16, 16), mode="bilinear").squeeze(1)
    # s = 0 everywhere: anomalous term relu(0.5) + normal term relu(0.5).
    assert perlin_pixel_loss(upsampled, masks).item() == pytest.approx(1.0)
    # sigmoid(0) = 0.5 for both images → MSE against (1, 0) = 0.25.
    assert perlin_image_loss(upsampled, labels).item() == pytest.approx(0.25)
    assert perlin_loss(logits, masks, labels).item() == pytest.approx(0.5 * 1.0 + 0.5 * 0.25)


def test_perlin_loss_perfect_and_empty_mask_cases() -> None:
    masks = torch.zeros(1, 8, 8)
    masks[0, :4] = 1.0
    upsampled = torch.full((1, 8, 8), 2.0)
    upsampled[0, :4] = -2.0  # anomalous pixels get low (anomalous) logits
    assert perlin_pixel_loss(upsampled, masks).item() == 0.0
    # No anomalous pixel in the batch: only the normal hinge, averaged over all pixels.
    logits = torch.tensor([[[0.0, 1.0], [0.25, 0.5]]])
    expected = torch.tensor([0.5, 0.0, 0.25, 0.0]).mean().item()
    assert perlin_pixel_loss(logits, torch.zeros(1, 2, 2)).item() == pytest.approx(expected)
    image = perlin_loss(logits, torch.zeros(1, 2, 2), torch.zeros(1))
    image_term = torch.sigmoid(torch.tensor(-0.0)).item() ** 2
    assert image.item() == pytest.approx(0.5 * expected + 0.5 * image_term)


def test_perlin_loss_gradient_flows() -> None:
    logits = torch.randn(2, *GRID, requires_grad=True)
    masks = torch.zeros(2, 16, 16)
    masks[1, 4:12, 4:12] = 1.0
    perlin_loss(logits, masks, torch.tensor([0.0, 1.0])).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_pool_mask_to_grid_matches_max_pool() -> None:
    masks = (torch.rand(3, 16, 16) > 0.9).float()
    expected = F.max_pool2d(masks.unsqueeze(1), kernel_size=4).squeeze(1) > 0.5
    assert torch.equal(pool_mask_to_grid(masks, GRID), expected)


def test_similarity_loss_values() -> None:
    torch.manual_seed(0)
    features = torch.randn(2, DIM, *GRID)
    empty = torch.zeros(2, 16, 16)
    assert similarity_loss(features, torch.randn_like(features), empty).item() == 0.0
    full = torch.ones(2, 16, 16)
    assert similarity_loss(features, features.clone(), full).item() == pytest.approx(1.0)
    assert similarity_loss(features, -features, full).item() == pytest.approx(-1.0)
    # Only the masked patch (0, 0) of image 0 counts: identical there, opposite elsewhere.
    augmented = -features.clone()
    augmented[0, :, 0, 0] = features[0, :, 0, 0]
    one_patch = torch.zeros(2, 16, 16)
    one_patch[0, 1, 2] = 1.0
    assert similarity_loss(features, augmented, one_patch).item() == pytest.approx(1.0)


def test_eval_mode_folds_batch_norm_into_the_linear_and_keeps_the_outputs() -> None:
    """Scoring runs Linear → BatchNorm1d → LeakyReLU as one affine map (running statistics folded
    in) and an in-place activation: the same logits as the three modules to float rounding, and
    training mode (batch statistics) untouched."""
    torch.manual_seed(0)
    model = DFDModel(32, (4, 4))
    for norm in (model.gaussian.body[1], model.perlin.embed[1]):
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.data.uniform_(0.5, 1.5)
        norm.bias.data.normal_()
    tokens = torch.randn(48, 32)
    model.eval()
    with torch.inference_mode():
        plain = model.gaussian.tail(model.gaussian.body(tokens)).squeeze(-1)
        torch.testing.assert_close(model.gaussian(tokens), plain, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(linear_norm_act(model.perlin.embed, tokens), model.perlin.embed(tokens), rtol=1e-5, atol=1e-5)
    model.train()
    torch.manual_seed(1)
    trained = model.gaussian(tokens)
    torch.testing.assert_close(trained, model.gaussian.tail(model.gaussian.body(tokens)).squeeze(-1), rtol=0, atol=0)
    assert model.gaussian.body[1].num_batches_tracked.item() == 2  # batch statistics were used (and tracked)


def test_scoring_in_bfloat16_autocasts_the_adaptor_and_perlin_path_and_keeps_the_gaussian_in_float32() -> None:
    """path_logits(compute_dtype=bfloat16) mirrors training under that precision: the adaptor and
    the Perlin discriminator in bfloat16, the Gaussian discriminator on the float32 copy of the
    projection; float32 outputs close to the float32 ones."""
    torch.manual_seed(0)
    model = DFDModel(32, (4, 4)).eval()
    features = torch.randn(3, 32, 4, 4)
    with torch.inference_mode():
        perlin32, gaussian32 = model.path_logits(features)
        perlin16, gaussian16 = model.path_logits(features, torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            projected = model.adaptor(features.flatten(2).transpose(1, 2))
            expected_perlin = model.perlin.forward_tokens(projected).float().reshape(3, 4, 4)
        expected_gaussian = model.gaussian(projected.float().reshape(-1, 32)).reshape(3, 4, 4)
    assert perlin16.dtype == gaussian16.dtype == torch.float32
    torch.testing.assert_close(perlin16, expected_perlin, rtol=0, atol=0)
    torch.testing.assert_close(gaussian16, expected_gaussian, rtol=0, atol=0)
    assert not torch.equal(perlin16, perlin32)  # bfloat16 did run
    torch.testing.assert_close(perlin16, perlin32, rtol=0.05, atol=0.05)
    torch.testing.assert_close(gaussian16, gaussian32, rtol=0.05, atol=0.05)
