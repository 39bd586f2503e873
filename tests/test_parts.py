"""Part learner: shapes, gradients, losses, a few optimisation steps, metrics and reference methods."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import PartsConfig
from pipeline.models.checkpoint import build_vit
from pipeline.parts.metrics import attention_head_parts, cls_attention, coherence, kmeans, part_shares, segmentation_stats, shuffle_within_images, shuffled_coherence
from pipeline.parts.model import PartLearner, diversity_loss, usage_loss
from pipeline.parts.train import build_part_learner, losses, part_ids, train_part_learner


def test_shapes_soft_partition_and_gradient_flow():
    model = PartLearner(dim=16, grid=(4, 4), num_parts=5, image_size=16, decoder_channels=8, style_dim=8)
    cls, patches = torch.randn(3, 16, requires_grad=True), torch.randn(3, 16, 16, requires_grad=True)
    out = model(cls, patches)
    assert out["maps"].shape == (3, 5, 4, 4) and out["recon"].shape == (3, 3, 16, 16)
    torch.testing.assert_close(out["maps"].sum(1), torch.ones(3, 4, 4))
    (out["recon"].abs().mean() + diversity_loss(out["maps"])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert cls.grad is not None and patches.grad is not None  # the losses reach the inputs through the maps
    with pytest.raises(ValueError, match="power of two"):
        PartLearner(dim=16, grid=(4, 4), image_size=20)


def test_diversity_loss_is_lower_for_disjoint_than_identical_maps():
    ids = torch.arange(16).view(1, 4, 4) % 4
    disjoint = F.one_hot(ids, 4).permute(0, 3, 1, 2).float()
    identical = torch.full((1, 4, 4, 4), 0.25)
    assert diversity_loss(disjoint) == 0.0
    assert diversity_loss(identical) == pytest.approx(0.25)
    soft = (disjoint * 0.7 + 0.075)
    assert 0.0 < diversity_loss(soft) < diversity_loss(identical)


def test_usage_loss_penalises_only_starved_parts():
    maps = torch.zeros(2, 3, 4, 4)
    maps[:, 0] = 1.0
    assert usage_loss(maps, 0.1) == pytest.approx(0.2)  # parts 1 and 2 each 0.1 short
    assert usage_loss(torch.full((2, 3, 4, 4), 1 / 3), 0.1) == 0.0


def test_a_few_steps_lower_the_loss():
    torch.manual_seed(0)
    cfg = PartsConfig(num_parts=4, epochs=15, batch_size=16, lr=3e-3, decoder_channels=8, style_dim=8)
    model = build_part_learner(cfg, 16, (4, 4), 16)
    cls, patches = torch.randn(32, 16), torch.randn(32, 16, 16)
    images = torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        before = losses(model, cls, patches, images, cfg)["loss"].item()
    stats = train_part_learner(model, cls, patches, images, cfg, torch.device("cpu"))
    with torch.no_grad():
        after = losses(model.eval(), cls, patches, images, cfg)["loss"].item()
    assert after < before and stats["epoch"] == 15
    ids = part_ids(model, cls, patches)
    assert ids.shape == (32, 4, 4) and ids.dtype == torch.uint8 and int(ids.max()) < 4
    assert part_ids(model, cls, patches, grid=(8, 8)).shape == (32, 8, 8)  # soft maps resized before argmax


def test_coherence_statistics():
    stripes = torch.arange(4).view(1, 4, 1).expand(4000, 4, 4)  # rows of one id each
    assert coherence(stripes) == pytest.approx(0.5)  # all horizontal pairs agree, no vertical pair
    # shuffled: two given positions hold one id with probability sum_k n_k (n_k - 1) / (n (n - 1)) = 4*4*3 / (16*15)
    assert shuffled_coherence(stripes) == pytest.approx(0.2, abs=0.005)
    assert shuffled_coherence(torch.zeros(3, 4, 4, dtype=torch.long)) == 1.0
    checker = (torch.arange(4).view(4, 1) + torch.arange(4)).remainder(2).expand(3, 4, 4)
    assert coherence(checker) == 0.0
    assert part_shares(stripes, 5).tolist() == [0.25, 0.25, 0.25, 0.25, 0.0]
    stats = segmentation_stats(stripes, 4)
    assert stats["min_share"] == stats["max_share"] == 0.25 and stats["coherence_gain"] == pytest.approx(0.3, abs=0.005)


def test_attention_heads_method_on_a_hand_built_attention_tensor():
    attn = torch.zeros(1, 3, 4)  # 3 heads, 2x2 grid
    attn[0, 0, 0], attn[0, 1, 1], attn[0, 2, 2], attn[0, 1, 3] = 0.9, 0.8, 0.7, 0.6
    assert attention_head_parts(attn, (2, 2)).tolist() == [[[0, 1], [2, 1]]]


def test_cls_attention_equals_the_attention_timm_computes():
    torch.manual_seed(0)
    vit = build_vit("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=4).eval()
    x = torch.randn(2, 3, 16, 16)
    captured = {}
    last = vit.blocks[-1].attn
    last.fused_attn = False
    last.attn_drop.register_forward_hook(lambda m, i, o: captured.setdefault("attn", o))
    with torch.no_grad():
        vit.forward_features(x)
    expected = captured["attn"][:, :, 0, 1:]
    torch.testing.assert_close(cls_attention(vit, x), expected)


def test_kmeans_separates_clusters():
    torch.manual_seed(0)
    a, b = torch.randn(50, 8) * 0.05 + torch.eye(8)[0], torch.randn(50, 8) * 0.05 + torch.eye(8)[1]
    centers = kmeans(torch.cat([a, b]), 2)
    assign = (F.normalize(torch.cat([a, b]), dim=1) @ centers.T).argmax(1)
    assert assign[:50].unique().numel() == 1 and assign[50:].unique().numel() == 1 and assign[0] != assign[50]


def test_channel_grouping_tokens_are_the_cls_token_reweighted_per_part():
    """The paper's form: P_i = d_i(c) * c with d_i(c) = sigmoid(W2 tanh(W1 c))_i, recomputed by hand."""
    torch.manual_seed(0)
    model = PartLearner(dim=16, grid=(4, 4), num_parts=5, image_size=16, decoder_channels=8, style_dim=8,
                        temperature=0.5, tokens="channel_grouping")  # fmt: skip
    assert not hasattr(model, "part_mlp") and not hasattr(model, "part_bias")
    cls, patches = torch.randn(3, 16), torch.randn(3, 16, 16)
    g = model.grouping
    d = torch.sigmoid(torch.tanh(cls @ g.fc1.weight.T + g.fc1.bias) @ g.fc2.weight.T + g.fc2.bias).view(3, 5, 16)
    tokens = d * cls[:, None]
    expected = torch.einsum("bnc,blc->bnl", tokens, patches) / (16**0.5 * 0.5)
    torch.testing.assert_close(model.part_logits(cls, patches), expected.view(3, 5, 4, 4))
    # each token keeps the CLS token's signs and never exceeds it: a re-weighting of its channels
    parts = g(cls)
    assert ((parts * cls[:, None]) >= 0).all() and (parts.abs() <= cls.abs()[:, None]).all()
    out = model(cls.requires_grad_(), patches)
    torch.testing.assert_close(out["maps"].sum(1), torch.ones(3, 4, 4))
    (out["recon"].abs().mean() + diversity_loss(out["maps"])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_token_forms_are_chosen_by_the_config_and_unknown_forms_refused():
    cfg = PartsConfig(num_parts=3, decoder_channels=8, style_dim=8)
    assert cfg.tokens == "mlp"
    mlp = build_part_learner(cfg, 16, (4, 4), 16)
    grouped = build_part_learner(PartsConfig(num_parts=3, decoder_channels=8, style_dim=8, tokens="channel_grouping"),
                                 16, (4, 4), 16)  # fmt: skip
    assert mlp.tokens == "mlp" and "part_mlp.0.weight" in mlp.state_dict()
    assert grouped.tokens == "channel_grouping" and "grouping.fc2.weight" in grouped.state_dict()
    assert build_part_learner(cfg, 16, (4, 4), 16, tokens="channel_grouping").tokens == "channel_grouping"
    with pytest.raises(ValueError, match="tokens='attention'"):
        PartLearner(dim=16, grid=(4, 4), image_size=16, tokens="attention")
    with pytest.raises(ValueError, match="tokens"):
        PartsConfig(tokens="attention")


def test_the_channel_grouping_learner_lowers_its_loss():
    torch.manual_seed(0)
    cfg = PartsConfig(num_parts=4, epochs=15, batch_size=16, lr=3e-3, decoder_channels=8, style_dim=8,
                      tokens="channel_grouping")  # fmt: skip
    model = build_part_learner(cfg, 16, (4, 4), 16)
    cls, patches = torch.randn(32, 16), torch.randn(32, 16, 16)
    images = torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        before = losses(model, cls, patches, images, cfg)["loss"].item()
    train_part_learner(model, cls, patches, images, cfg, torch.device("cpu"))
    with torch.no_grad():
        after = losses(model.eval(), cls, patches, images, cfg)["loss"].item()
    assert after < before


def test_shuffling_inside_images_keeps_each_images_ids_and_moves_them():
    ids = torch.arange(2 * 16).view(2, 4, 4) % 5
    out = shuffle_within_images(ids, seed=1)
    for b in range(2):
        assert sorted(out[b].flatten().tolist()) == sorted(ids[b].flatten().tolist())  # same ids, same image
    assert not torch.equal(out, ids) and torch.equal(out, shuffle_within_images(ids, seed=1))
    assert not torch.equal(shuffle_within_images(ids, seed=1), shuffle_within_images(ids, seed=2))
    # across images the permutations differ (one shared permutation would keep the images' layout in common)
    same = torch.arange(16).view(1, 4, 4).expand(2, 4, 4)
    shuffled = shuffle_within_images(same, seed=0)
    assert not torch.equal(shuffled[0], shuffled[1])
