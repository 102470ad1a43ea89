"""CALM's learned exit classifier: training on a frozen tiny LM, the ``calm_learned`` policy,
saving / loading, decoding with it (every KV mode) and Learn-then-Test certification."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.lmkit import EOS, LAYERS, VOCAB, left_padded, tiny_lm

from exitwise.calibration.ltt import CalibrationRefused, certify_threshold, early_exit_losses
from exitwise.errors import CheckpointError, ConfigError, InputError
from exitwise.generation import generate
from exitwise.lm import CalmConfig, tune_exits  # noqa: E402
from exitwise.lm.objectives.calm import consistency_bce, roc_auc  # noqa: E402
from exitwise.policies import get_policy, policy_from_dict
from exitwise.policies.calm_learned import CalmExitClassifier, CalmLearnedPolicy


def train_calm(model, texts, tokenizer=None, *, output_dir=None,
                          self_generate_prompts=None, **options):
    if self_generate_prompts is not None:
        options["prompts"] = self_generate_prompts
    return tune_exits(model, texts, CalmConfig(**options), tokenizer=tokenizer,
                      output_dir=output_dir, progress=False)

NEW = 8


def _texts(n: int = 150, length: int = 32, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (length,), generator=g).tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def llama():
    return tiny_lm("llama")


@pytest.fixture(scope="module")
def trained(llama, tmp_path_factory):
    folder = tmp_path_factory.mktemp("calm_clf")
    result = train_calm(
        llama, _texts(), exit_layers=[1, 2, 3], steps=300, lr=1e-2, batch_size=512,
        output_dir=folder,
    )
    return result, folder


def test_training_lowers_bce_and_beats_chance(trained):
    result, _ = trained
    assert list(result.after) == [1, 2, 3] and result.metric == "bce"
    assert result.num_train > 3000 and result.num_eval > 500
    for d in result.after:
        # Consistency is neither always nor never: there is something to predict.
        assert 0.6 < result.extras["base_rate"][d] < 0.95
        # bce before is the best input-blind predictor (the base rate): beating it is signal.
        assert result.after[d] < result.before[d] - 0.01, d
        assert result.extras["auc_after"][d] > 0.62, d  # held-out sequences, chance = 0.5
    first = sum(result.loss_history[:10]) / 10
    last = sum(result.loss_history[-10:]) / 10
    assert last < first
    assert "bce_after" in result.table() and result.artifact.exit_layers == [1, 2, 3]


def test_consistency_bce_by_hand():
    logits, labels = torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0])
    want = (math.log(2.0) + math.log(1.0 + math.exp(2.0))) / 2
    assert float(consistency_bce(logits, labels)) == pytest.approx(want)


def test_roc_auc_reference_values():
    y = torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert roc_auc(torch.tensor([0.1, 0.2, 0.8, 0.9]), y) == 1.0
    assert roc_auc(torch.tensor([0.9, 0.8, 0.2, 0.1]), y) == 0.0
    assert roc_auc(torch.zeros(4), y) == 0.5  # ties count half
    assert roc_auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), y) == 0.75
    assert math.isnan(roc_auc(torch.rand(3), torch.ones(3)))


def test_saved_classifier_round_trips(trained, tmp_path):
    result, folder = trained
    loaded = CalmExitClassifier.from_pretrained(folder)
    mine = result.artifact.state_dict()
    theirs = loaded.state_dict()
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert torch.equal(mine[key].cpu(), theirs[key]), key
    policy = get_policy("calm_learned", threshold=0.7, tau=0.0, classifier=str(folder))
    data = policy.to_dict()
    assert data["classifier"] == str(folder)
    again = policy_from_dict(data)
    assert isinstance(again, CalmLearnedPolicy) and again.to_dict() == data
    assert policy.with_param(0.2).params["classifier"] == str(folder)
    with pytest.raises(CheckpointError, match="no CALM classifier"):
        get_policy("calm_learned", classifier=str(tmp_path))
    with pytest.raises(ConfigError, match="classifier must be"):
        get_policy("calm_learned", classifier=3)


def test_policy_decides_from_the_hidden_state(trained):
    result, _ = trained
    clf = result.artifact
    policy = get_policy("calm_learned", threshold=0.5, tau=0.0, classifier=clf)
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(6, 32, generator=g) * 3
    logits = torch.randn(6, VOCAB, generator=g)
    state = {"hidden": hidden, "exit_depth": torch.full((6,), 2)}
    exits, _ = policy.decide(1, 4, logits, state)
    lam = 0.9 * 0.5 + 0.1  # CALM's lambda_t at tau = 0
    assert torch.equal(exits, clf.prob(hidden, 2) > lam)
    assert exits.any() or (~exits).any()
    # Same rows at another depth: another probe, so another score.
    other = clf.prob(hidden, 3)
    assert not torch.allclose(other, clf.prob(hidden, 2))
    # Without exit_depth, exit_index k maps to the k-th trained exit when the exits match.
    assert torch.equal(policy.decide(1, 4, logits, {"hidden": hidden})[0], exits)
    with pytest.raises(ConfigError, match="exit_depth"):
        policy.decide(1, 6, logits, {"hidden": hidden})
    with pytest.raises(ConfigError, match="trained for exits"):
        policy.decide(0, 4, logits, {"hidden": hidden, "exit_depth": torch.full((6,), 7)})
    with pytest.raises(InputError, match="hidden states"):
        policy.decide(0, 4, logits, {"hidden": hidden[:, :5], "exit_depth": state["exit_depth"]})
    # Only logits (classification executor, offline replay): never exits early.
    assert not policy.decide(0, 4, logits, {})[0].any()
    # Hidden states but no classifier: a clear error, not a silent never-exit.
    with pytest.raises(ConfigError, match="trained classifier"):
        get_policy("calm_learned").decide(0, 4, logits, state)


def _saturated(hidden_size: int) -> CalmExitClassifier:
    """A classifier whose probability is exactly 1.0 in float32 for every input."""
    clf = CalmExitClassifier(hidden_size, list(range(1, LAYERS)))
    with torch.no_grad():
        for probe in clf.probes.values():
            probe.net.bias.fill_(60.0)
    return clf


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("lengths", [(6,), (7, 3, 5)])
def test_never_exit_equals_greedy(family, lengths):
    model = tiny_lm(family)
    ids, mask = left_padded(lengths)
    ref = generate(model, ids, mask, max_new_tokens=NEW, eos_token_id=EOS)
    never = CalmLearnedPolicy(threshold=1.0, tau=0.0, classifier=_saturated(32))
    for kv in ("skip", "propagate"):
        out = generate(model, ids, mask, strategy="early_exit", policy=never, kv=kv,
                       max_new_tokens=NEW, eos_token_id=EOS)
        assert torch.equal(out.sequences, ref.sequences), kv
        assert out.stats.early_exit_rate == 0.0
        assert out.stats.layer_applications == ref.stats.layer_applications
        assert out.stats.sequential_layers == ref.stats.sequential_layers
    # The same classifier with a threshold below 1 exits at the first exit every time.
    always = never.with_param(0.5)
    out = generate(model, ids, mask, strategy="early_exit", policy=always, kv="skip",
                   max_new_tokens=NEW, eos_token_id=None)
    assert all(d == 1 for row in out.stats.token_depths for d in row)


def test_learned_policy_decodes_with_real_skipping(trained, llama):
    result, _ = trained
    ids, mask = left_padded((7, 3, 5))
    kw = dict(strategy="early_exit", max_new_tokens=12, eos_token_id=None)
    greedy = generate(llama, ids, mask, max_new_tokens=12, eos_token_id=None)
    policy = get_policy("calm_learned", threshold=0.8, tau=0.0, classifier=result.artifact)
    skip = generate(llama, ids, mask, policy=policy, kv="skip", **kw)
    recompute = generate(llama, ids, mask, policy=policy, kv="recompute", **kw)
    depths = [d for row in skip.stats.token_depths for d in row]
    assert min(depths) < LAYERS and max(depths) == LAYERS  # mixed exits, per token
    # Both modes attend to exact K/V, so they make the same decisions and tokens.
    assert torch.equal(skip.sequences, recompute.sequences)
    assert skip.stats.token_depths == recompute.stats.token_depths
    assert skip.stats.sequential_layers < greedy.stats.sequential_layers
    assert skip.stats.sequential_layers < recompute.stats.sequential_layers


def test_ltt_certifies_a_learned_threshold(trained, llama):
    _, folder = trained
    ids, mask = left_padded((5, 4, 6, 3, 5, 6, 4, 5, 6, 3), seed=4)
    params = {"classifier": str(folder), "tau": 0.0}
    losses = early_exit_losses(
        llama, ids, mask, "calm_learned", [1.0, 0.95, 0.0], max_new_tokens=6, kv="skip",
        policy_params=params, eos_token_id=None,
    )
    assert losses[1.0] == [0.0] * 10  # never exits: identical to greedy
    assert sum(losses[0.0]) > 0  # always exits at the first exit: errors
    res = certify_threshold(losses, epsilon=0.3, delta=0.2)
    assert res.certified[0] == 1.0 and res.threshold is not None
    assert 0.0 not in res.certified
    with pytest.raises(CalibrationRefused):
        certify_threshold({lam: v[:2] for lam, v in losses.items()}, epsilon=0.3, delta=0.2)


def test_bad_arguments_raise_clear_errors(llama):
    texts = _texts(4, 8)
    with pytest.raises(ConfigError, match="steps"):
        train_calm(llama, texts, steps=0)
    with pytest.raises(ConfigError, match="kind"):
        train_calm(llama, texts, kind="forest")
    with pytest.raises(ConfigError, match="exit_layers"):
        train_calm(llama, texts, exit_layers=[LAYERS])
    with pytest.raises(ConfigError, match="lr"):
        train_calm(llama, texts, lr=-1.0)


def test_self_generated_data_and_multi_exit_heads(tmp_path):
    """texts=None trains on the model's own continuations; a MultiExitModel's trained exit
    heads (here an MLP adapter) define the exit tokens the labels compare."""
    import exitwise as ew

    model = tiny_lm("llama", seed=1)
    config = ew.ExitConfig(layers=[2], head="lm", num_labels=VOCAB,
                           head_kwargs={"adapter": "mlp"}, final_head_kwargs={})
    multi = ew.attach_exits(model, config).eval()
    with torch.no_grad():
        for p in multi.heads[0].parameters():
            p.add_(torch.randn_like(p) * 0.2)
    prompts = [t[:4] for t in _texts(6, 4, seed=5)]
    result = train_calm(
        multi, None, self_generate_prompts=prompts, gen_tokens=10, steps=5,
        output_dir=tmp_path, eval_fraction=0.34,
    )
    assert result.extras["self_generated"] and list(result.after) == [2]
    assert (tmp_path / "self_generated.json").is_file()
    assert result.num_train == 4 * 14  # 4 of 6 sequences, prompt + 10 new tokens each
    # The labels follow the adapter head, not the shared readout: rates differ.
    plain = train_calm(
        model, None, self_generate_prompts=prompts, gen_tokens=10, steps=5, eval_fraction=0.34,
        exit_layers=[2],
    )
    assert plain.extras["base_rate"][2] != result.extras["base_rate"][2]
    ids, mask = left_padded((5, 3))
    out = generate(multi, ids, mask, strategy="early_exit", policy=get_policy(
                       "calm_learned", threshold=0.0, tau=0.0, classifier=result.artifact),
                   kv="skip", max_new_tokens=4, eos_token_id=None)
    assert out.stats.exit_depths == [2, LAYERS]
