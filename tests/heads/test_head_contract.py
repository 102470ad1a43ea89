"""Contract every registered exit head keeps (new heads are picked up automatically)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_encoder

import exitwise as ew
from exitwise.errors import ConfigError

B, T, H, C = 3, 6, 16, 4
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])


# Heads that wrap a model's own classifier take that model's own input form, not the
# contract's; tests/heads/test_native_head.py covers them on every family.
STANDALONE = [n for n in ew.HEADS.names() if not ew.HEADS.get(n).needs_own_classifier]


@pytest.fixture(params=STANDALONE)
def head(request):
    torch.manual_seed(0)
    return ew.build_head(request.param, H, C, dropout=0.0).eval()


def test_registered_name(head):
    assert type(head).registered_name in ew.HEADS.names()
    assert isinstance(head, ew.ExitHead)


@pytest.mark.parametrize(
    "shape, mask",
    [((B, T, H), MASK), ((B, T, H), None), ((B, H), None), ((B, H, 5, 5), None)],
    ids=["tokens+mask", "tokens", "flat", "feature-map"],
)
def test_output_shape(head, shape, mask):
    out = head(torch.randn(*shape), mask)
    assert out.shape == (B, C)
    assert torch.isfinite(out).all()


def test_masked_positions_do_not_matter(head):
    hidden = torch.randn(B, T, H)
    noisy = hidden.clone()
    noisy[MASK == 0] = torch.randn(int((MASK == 0).sum()), H) * 100
    torch.testing.assert_close(head(hidden, MASK), head(noisy, MASK))


def test_rows_are_independent(head):
    # A head reads each row on its own: row r alone gives the batched row r.
    hidden = torch.randn(B, T, H)
    batched = head(hidden, MASK)
    for r in range(B):
        n = int(MASK[r].sum())
        alone = head(hidden[r : r + 1, :n], torch.ones(1, n, dtype=torch.long))
        torch.testing.assert_close(alone[0], batched[r], atol=1e-6, rtol=0)


def test_head_flops(head):
    flops = head.head_flops(MASK, B)
    assert flops.shape == (B,) and flops.dtype == torch.float64
    assert (flops > 0).all()
    unmasked = head.head_flops(None, B)
    assert unmasked.shape == (B,) and (unmasked > 0).all()
    # never more work for a shorter row
    assert flops[0] >= flops[1] >= flops[2]


def test_gradients_flow(head):
    head.train()
    hidden = torch.randn(B, T, H, requires_grad=True)
    extra = {}
    if ew.heads.uses_previous_logits(head):
        # A cascade head's link reads the previous exit's logits; it starts at zero (a fresh
        # cascade head is its base head), which would block the gradient to what feeds it.
        extra["previous_logits"] = torch.randn(B, C)
        with torch.no_grad():
            for p in head.parameters():
                if not p.any():
                    p.normal_()
    loss = torch.nn.functional.cross_entropy(
        head(hidden, MASK, **extra), torch.tensor([0, 1, 3])
    )
    loss.backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0


def test_dropout_is_active_only_in_training():
    torch.manual_seed(0)
    head = ew.build_head("linear", H, C, dropout=0.5)
    x = torch.randn(B, H)
    assert torch.equal(head.eval()(x), head(x))
    head.train()
    assert not torch.equal(head(x), head(x))


def test_mean_head_averages_real_tokens_only():
    head = ew.build_head("mean", H, C, dropout=0.0)
    hidden = torch.randn(B, T, H)
    expected = torch.stack([hidden[r, : int(MASK[r].sum())].mean(0) for r in range(B)])
    torch.testing.assert_close(head(hidden, MASK), head.classifier(expected))


def test_feature_maps_are_pooled_over_space():
    head = ew.build_head("linear", H, C, dropout=0.0)
    maps = torch.randn(B, H, 3, 4)
    torch.testing.assert_close(head(maps), head(maps.mean((2, 3))))


@pytest.mark.parametrize("family", ["bert", "albert"])
def test_pooler_head_starts_from_the_backbone_pooler(family):
    encoder = tiny_encoder(family)
    model = ew.attach_exits(encoder, layers="all", head="pooler", num_labels=2)
    pooler = model.backbone.pooler_module()
    assert isinstance(pooler, torch.nn.Linear)
    for h in model.heads:
        assert torch.equal(h.dense.weight, pooler.weight)
        assert torch.equal(h.dense.bias, pooler.bias)
        assert h.dense.weight.data_ptr() != pooler.weight.data_ptr()  # a copy, not shared
    fresh = ew.attach_exits(
        encoder, head="pooler", num_labels=2, head_kwargs={"init_from_pooler": False}
    )
    assert not torch.equal(fresh.heads[0].dense.weight, pooler.weight)


def test_final_head_can_differ():
    model = ew.attach_exits(tiny_encoder("bert"), head="linear", final_head="mlp", num_labels=2)
    kinds = [type(h).registered_name for h in model.heads]
    assert kinds == ["linear", "linear", "linear", "mlp"]


def test_mlp_hidden_features_option():
    head = ew.build_head("mlp", H, C, hidden_features=7)
    assert head.fc1.out_features == 7


def test_bad_head_requests():
    with pytest.raises(ConfigError) as err:
        ew.build_head("nope", H, C)
    assert all(name in str(err.value) for name in ew.HEADS.names())
    with pytest.raises(ConfigError, match="bad options"):
        ew.build_head("linear", H, C, width=3)
    with pytest.raises(ConfigError, match="dropout"):
        ew.build_head("linear", H, C, dropout=-0.1)
    with pytest.raises(ConfigError, match="num_labels"):
        ew.build_head("linear", H, 0)


@pytest.mark.parametrize("name, options, match", [
    ("mlp", {"hidden_features": 0}, "hidden_features"),  # 0 once meant the input width
    ("mlp", {"hidden_features": -3}, "hidden_features"),
    ("fastbert", {"width": 30, "num_heads": 4}, "multiple of num_heads"),
    ("fastbert", {"width": 0}, "width"),
])
def test_head_sizes_are_checked_before_torch_sees_them(name, options, match):
    with pytest.raises(ConfigError, match=match):
        ew.build_head(name, H, C, **options)
