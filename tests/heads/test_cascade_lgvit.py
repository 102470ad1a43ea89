"""Cascade heads (ZTW / IMTA / BoostNet) and LGViT's local and global heads.

The cascade mechanism: a head that declares ``uses_previous_logits`` receives the previous
exit's raw logits in ``forward``, in the real early-exit executor (rows leaving the batch take
their previous logits with them) and in the logits cache.
"""

from __future__ import annotations

import pytest
import torch
from helpers.cnn import block_features
from torch import nn

import exitwise as ew
from exitwise.analysis.cache import collect_exit_logits
from exitwise.errors import ConfigError
from exitwise.policies.base import get_policy


def cnn_model(head: str = "cascade", seed: int = 0, **head_kwargs) -> ew.MultiExitModel:
    torch.manual_seed(seed)
    stem = nn.Conv2d(1, 6, 3, padding=1)
    blocks = nn.Sequential(
        nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(6, 8, 3, padding=1, stride=2), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()),
    )
    backbone = ew.SequentialBackbone(blocks, stem=stem, example=torch.randn(1, 1, 8, 8))
    model = ew.attach_exits(
        backbone, ew.ExitConfig(layers="all", head=head, num_labels=5, dropout=0.0,
                                head_kwargs=head_kwargs)
    )
    with torch.no_grad():  # non-zero cascade weights and spread-out confidences
        for h in model.heads:
            for p in h.parameters():
                p.copy_(torch.randn_like(p) * 0.7)
    return model.eval()


def images(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("combine", ["linear", "isc", "additive"])
def test_forward_feeds_the_previous_logits(combine):
    model = cnn_model(combine=combine)
    x = images()
    out = model(pixel_values=x).logits
    feats = block_features(model, x)
    with torch.no_grad():
        for k, (hidden, mask) in enumerate(feats):
            prev = out[k - 1] if k else None
            torch.testing.assert_close(out[k], model.heads[k](hidden, mask, previous_logits=prev))
            if k:  # the previous exit really matters
                other = model.heads[k](hidden, mask, previous_logits=prev + 3.0 * torch.randn_like(prev))
                assert not torch.allclose(other, out[k])
    if combine == "additive":  # BoostNet: exit k = exit k-1 + own residual
        base = model.heads[1].base(*feats[1])
        torch.testing.assert_close(out[1], out[0] + base)


@pytest.mark.parametrize("combine", ["linear", "isc", "additive"])
def test_first_exit_is_its_base_head(combine):
    """The first exit has no previous exit: it outputs its base head's logits (the reference's
    first cascading head has no cascading input)."""
    head = ew.build_head("cascade", 6, 5, dropout=0.0, base="linear", combine=combine).eval()
    if head.previous is not None:
        with torch.no_grad():
            head.previous.weight.copy_(torch.randn_like(head.previous.weight))
    x = torch.randn(3, 6)
    torch.testing.assert_close(head(x), head.base(x))
    if combine != "additive":  # with a previous exit, the link adds to it
        assert not torch.allclose(head(x, previous_logits=torch.randn(3, 5)), head.base(x))


@pytest.mark.parametrize("detach", [True, False])
def test_detach_previous_controls_the_gradient_into_earlier_exits(detach):
    model = cnn_model(detach_previous=detach).train()
    out = model(pixel_values=images()).logits
    out[1].sum().backward()
    grad = model.heads[0].base.classifier.weight.grad
    assert (grad is None or not grad.any()) if detach else grad.abs().sum() > 0


def test_never_exit_policy_in_the_executor_equals_forward():
    model = cnn_model()
    x = images()
    with torch.no_grad():
        expected = model(pixel_values=x).logits[-1]
    result = model.early_exit(get_policy("never"), pixel_values=x)
    torch.testing.assert_close(result.logits, expected, atol=1e-5, rtol=1e-5)
    assert (result.exit_index == model.num_exits - 1).all()
    torch.testing.assert_close(model.full_depth(pixel_values=x), expected)


def test_rows_exit_the_same_batched_and_alone():
    model = cnn_model()
    x = images(8)
    with torch.no_grad():
        conf = torch.stack([z.softmax(-1).amax(-1) for z in model(pixel_values=x).logits[:-1]])
    policy = get_policy("confidence", threshold=float(conf.max(0).values.quantile(0.5)))
    batched = model.early_exit(policy, pixel_values=x)
    assert 0 < int((batched.exit_index < model.num_exits - 1).sum()) < 8  # rows really leave
    assert batched.rows_per_layer[-1] < 8
    for r in range(8):
        alone = model.early_exit(policy, pixel_values=x[r : r + 1])
        assert int(alone.exit_index[0]) == int(batched.exit_index[r])
        torch.testing.assert_close(alone.logits[0], batched.logits[r], atol=1e-5, rtol=1e-5)


def test_logits_cache_feeds_the_previous_logits():
    model = cnn_model()
    x, y = images(), torch.arange(6) % 5
    cache = collect_exit_logits(model, [(x, y)], progress=False)
    with torch.no_grad():
        expected = torch.stack(model(pixel_values=x).logits, 1)
    torch.testing.assert_close(cache.logits, expected)


def test_saved_cascade_heads_and_ensemble_load_bit_identical(tmp_path):
    model = cnn_model(combine="linear")
    ens = model.attach_ensemble()
    with torch.no_grad():
        ens.raw_weight.copy_(torch.randn_like(ens.raw_weight))
        ens.bias.copy_(torch.randn_like(ens.bias))
    model.save_pretrained(tmp_path)
    loaded = ew.MultiExitModel.from_pretrained(tmp_path, backbone=model.backbone)
    for (n, a), (_, b) in zip(model.heads.state_dict().items(), loaded.heads.state_dict().items()):
        assert torch.equal(a, b), n
    assert loaded.ensemble is not None
    assert torch.equal(loaded.ensemble.raw_weight, ens.raw_weight)
    assert torch.equal(loaded.ensemble.bias, ens.bias)
    x = images()
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=x).stacked(), model(pixel_values=x).stacked())


def test_geometric_ensemble_formula():
    ens = ew.heads.GeometricEnsemble(3, 4)
    with torch.no_grad():
        ens.raw_weight.normal_()
        ens.bias.normal_()
    z = torch.randn(2, 3, 4)
    w = ens.weights
    assert (w >= 0).all() and not w.triu(1).any()
    q = ens(z)
    logp = z.log_softmax(-1)
    k = 2
    manual = ens.bias[k] + sum(w[k, j] * logp[:, j] for j in range(3))
    torch.testing.assert_close(q[:, k], manual)
    # row 0 only sees exit 0
    torch.testing.assert_close(q[:, 0], ens.bias[0] + w[0, 0] * logp[:, 0])


def test_bad_cascade_options():
    with pytest.raises(ConfigError, match="base"):
        ew.build_head("cascade", 6, 5, base="cascade")
    with pytest.raises(ConfigError, match="combine"):
        ew.build_head("cascade", 6, 5, combine="max")
    with pytest.raises(ConfigError, match="base_kwargs"):
        ew.build_head("cascade", 6, 5, base="linear", base_kwargs={"nope": 1})
    with pytest.raises(ConfigError, match="reweight"):  # BoostNet's, for combine='additive'
        ew.build_head("cascade", 6, 5, combine="linear", reweight=0.5)
    with pytest.raises(ConfigError, match="reweight"):
        ew.build_head("cascade", 6, 5, combine="additive", reweight=-1.0)
    with pytest.raises(ConfigError, match="isc_features"):  # IMTA's, for combine='isc'
        ew.build_head("cascade", 6, 5, combine="linear", isc_features=4)
    assert ew.build_head("cascade", 6, 5, base="linear", combine="isc",
                         isc_features=4).isc[0].out_features == 4


# -- LGViT --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["lgvit_local", "lgvit_global"])
def test_lgvit_vit_tokens_are_read_as_the_patch_grid(name):
    torch.manual_seed(0)
    head = ew.build_head(name, 8, 3, dropout=0.0).eval()
    grid = torch.randn(2, 8, 4, 4)
    tokens = torch.cat([torch.randn(2, 1, 8), grid.flatten(2).transpose(1, 2)], 1)  # CLS + 16
    out = head(tokens)
    if name == "lgvit_local":  # the CLS token is not a patch: same as the bare feature map
        torch.testing.assert_close(out, head(grid))
    else:  # the CLS token joins the aggregated patches in attention
        assert not torch.allclose(out, head(grid))
        torch.testing.assert_close(head(tokens[:, 1:]), head(grid))


@pytest.mark.parametrize("name", ["lgvit_local", "lgvit_global"])
def test_lgvit_heads_on_a_vit_read_its_tokens_as_the_grid_despite_the_mask(name):
    # the vision adapter gives ViT tokens an all-ones mask; the heads once took any mask for
    # text and convolved a line of 17 tokens (the CLS token as a patch) instead of a 4 x 4 grid
    pytest.importorskip("timm")
    from helpers.vision import SIZE, images, tiny_vision

    from exitwise.backbones import VisionBackbone

    model = ew.attach_exits(VisionBackbone(tiny_vision("timm-vit"), image_size=SIZE),
                            ew.ExitConfig(layers=[2, 4], head=name, num_labels=3,
                                          dropout=0.0)).eval()
    head = model.heads[0]
    assert head.patch_tokens
    state = model.backbone.start(pixel_values=images(2))
    state = model.block_step(0, state)[0]
    state = model.block_step(1, state)[0]
    hidden, mask = model.backbone.features(state)
    assert mask is not None and bool(mask.all()) and hidden.shape[1] == 17  # CLS + 4 x 4
    with torch.no_grad():
        torch.testing.assert_close(head(hidden, mask), head(hidden, None))
    # on text (a mask with padding) the same head reads a line
    text_head = ew.build_head(name, hidden.shape[-1], 3, dropout=0.0).eval()
    assert not text_head.patch_tokens


def test_lgvit_local_mixes_neighbouring_patches_only():
    torch.manual_seed(0)
    head = ew.build_head("lgvit_local", 8, 3, dropout=0.0).eval()
    grid = torch.randn(1, 8, 5, 5)
    base = head(grid)
    far = grid.clone()
    far[..., 0, 0] += 3.0 * torch.randn(8)  # a change in one patch reaches the output
    assert not torch.allclose(head(far), base)
    x = grid.clone().requires_grad_(True)
    # the output at patch (2, 2) depends on its 3x3 neighbourhood only
    feats = {}
    head.norm.register_forward_hook(lambda m, i, o: feats.setdefault("o", o))
    head(x)
    feats["o"][0, 2, 2].sum().backward()
    touched = x.grad[0].abs().sum(0) > 0
    assert touched[1:4, 1:4].all() and touched.sum() == 9


def test_lgvit_global_aggregates_windows():
    torch.manual_seed(0)
    head = ew.build_head("lgvit_global", 8, 3, dropout=0.0, reduction=2).eval()
    grid = torch.randn(1, 8, 4, 4)
    tokens, keep = head.aggregate(grid, torch.ones(1, 1, 4, 4))
    assert tokens.shape == (1, 4, 8) and keep.all()
    torch.testing.assert_close(tokens[0, 0], grid[0, :, :2, :2].mean((1, 2)))


def test_lgvit_bad_options():
    with pytest.raises(ConfigError, match="kernel_size"):
        ew.build_head("lgvit_local", 8, 3, kernel_size=2)
    with pytest.raises(ConfigError, match="reduction"):
        ew.build_head("lgvit_global", 8, 3, reduction=0)
    with pytest.raises(ConfigError, match="num_heads"):
        ew.build_head("lgvit_global", 8, 3, num_heads=3)
