"""Exit weight schedules and the losses built from them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers.trainkit import tiny_model

from exitwise.errors import ConfigError
from exitwise.outputs import ExitOutputs
from exitwise.training import exit_weights, get_strategy


def test_uniform_weights_are_all_equal_and_normalised():
    assert exit_weights("uniform", [1, 2, 3, 4]) == pytest.approx([0.25] * 4)


def test_depth_weights_follow_pabee():
    # PABEE: w_k = d_k / sum(d) -> sum(d_k * L_k) / sum(d_k)
    assert exit_weights("depth", [1, 2, 3, 4]) == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert exit_weights("depth", [2, 4]) == pytest.approx([1 / 3, 2 / 3])


def test_custom_weights_are_normalised():
    assert exit_weights([1, 0, 0, 1], [1, 2, 3, 4]) == pytest.approx([0.5, 0, 0, 0.5])
    assert exit_weights([2.0, 6.0], [3, 4]) == pytest.approx([0.25, 0.75])


@pytest.mark.parametrize(
    "spec, match",
    [
        ("cubic", "unknown exit weight schedule"),
        ([1, 2], "2 exit weights"),
        ([1, -1, 1, 1], ">= 0"),
        ([0, 0, 0, 0], "sum to 0"),
        (["a", 1, 1, 1], "numbers"),
        ([float("nan"), 1, 1, 1], "finite"),
    ],
)
def test_bad_weights_raise_config_error(spec, match):
    with pytest.raises(ConfigError, match=match):
        exit_weights(spec, [1, 2, 3, 4])


def test_joint_loss_is_the_weighted_sum_of_exit_cross_entropies():
    model = tiny_model(layers=[1, 3])  # exits at depths 1, 3 and the final 4
    assert model.exit_layers == [1, 3, 4]
    g = torch.Generator().manual_seed(0)
    outputs = ExitOutputs(logits=[torch.randn(5, 2, generator=g) for _ in range(3)])
    labels = torch.tensor([0, 1, 1, 0, 1])
    ce = [F.cross_entropy(x, labels) for x in outputs.logits]
    for spec, w in [
        ("uniform", [1 / 3] * 3),
        ("depth", [1 / 8, 3 / 8, 4 / 8]),
        ([1, 1, 2], [0.25, 0.25, 0.5]),
    ]:
        (stage,) = get_strategy("joint", weights=spec).stages(model)
        expected = sum(wk * c for wk, c in zip(w, ce))
        torch.testing.assert_close(stage.loss(outputs, labels), expected)


def test_joint_freezes_heads_with_zero_weight():
    model = tiny_model()
    (stage,) = get_strategy("joint", weights=[0, 1, 0, 1]).stages(model)
    heads = {n.split(".")[1] for n in stage.trainable_names(model) if n.startswith("heads.")}
    assert heads == {"1", "3"}


def test_two_stage_losses():
    model = tiny_model()
    s1, s2 = get_strategy("two_stage").stages(model)
    g = torch.Generator().manual_seed(1)
    outputs = ExitOutputs(logits=[torch.randn(4, 2, generator=g) for _ in range(4)])
    labels = torch.tensor([1, 0, 1, 1])
    ce = [F.cross_entropy(x, labels) for x in outputs.logits]
    torch.testing.assert_close(s1.loss(outputs, labels), ce[3])
    torch.testing.assert_close(s2.loss(outputs, labels), ce[0] + ce[1] + ce[2])


def test_stage_args_override_per_stage():
    strategy = get_strategy("two_stage", stage_args=[{}, {"learning_rate": 0.1}])
    s1, s2 = strategy.stages(tiny_model())
    assert s1.args == {} and s2.args == {"learning_rate": 0.1}
    with pytest.raises(ConfigError, match="2 stage"):
        get_strategy("two_stage", stage_args=[{}]).stages(tiny_model())
