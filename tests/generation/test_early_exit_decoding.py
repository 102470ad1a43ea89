"""CALM-style early-exit decoding: never-exit == greedy, real early exits, exact KV in
recompute mode, CALM policies and clear errors."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.lmkit import DECODER_FAMILIES, EOS, LAYERS, PAD, full_cache, left_padded, tiny_lm

import exitwise as ew
from exitwise.errors import ConfigError
from exitwise.generation import DecodeSession, generate
from exitwise.generation.early_exit import EarlyExitStats, early_exit_decode
from exitwise.generation.exit_points import resolve_exit_points
from exitwise.policies import get_policy
from exitwise.policies.calm_base import decayed_threshold

NEW = 8
ATOL = 1e-4


@pytest.fixture(scope="module")
def llama():
    return tiny_lm("llama")


def _never():
    return get_policy("calm_softmax", threshold=1.0, tau=0.0)


@pytest.mark.parametrize("kv", ["propagate", "recompute"])
@pytest.mark.parametrize("lengths", [(6,), (7, 3, 5)])
def test_never_exit_equals_greedy(llama, kv, lengths):
    ids, mask = left_padded(lengths)
    ref = generate(llama, ids, mask, max_new_tokens=NEW, eos_token_id=EOS)
    for policy in (_never(), "never", get_policy("calm_saturation", threshold=1.0, tau=0.0)):
        out = generate(
            llama, ids, mask, strategy="early_exit", policy=policy, kv=kv,
            max_new_tokens=NEW, eos_token_id=EOS,
        )
        assert torch.equal(out.sequences, ref.sequences)
        assert out.stats.early_exit_rate == 0.0
        assert out.stats.layer_applications == ref.stats.layer_applications
        assert out.stats.fill_applications == 0


@pytest.mark.parametrize("family", ["gpt2", "mistral"])
def test_never_exit_equals_greedy_other_families(family):
    model = tiny_lm(family)
    ids, mask = left_padded()
    ref = generate(model, ids, mask, max_new_tokens=NEW, eos_token_id=EOS)
    out = generate(model, ids, mask, strategy="early_exit", policy=_never(), kv="recompute",
                   max_new_tokens=NEW, eos_token_id=EOS)
    assert torch.equal(out.sequences, ref.sequences)


@pytest.mark.parametrize("kv", ["propagate", "recompute"])
def test_permissive_threshold_exits_early(llama, kv):
    ids, mask = left_padded()
    ref = generate(llama, ids, mask, max_new_tokens=NEW, eos_token_id=EOS)
    out = generate(
        llama, ids, mask, strategy="early_exit", kv=kv, max_new_tokens=NEW, eos_token_id=EOS,
        policy=get_policy("calm_saturation", threshold=0.0, tau=0.0),
    )
    stats = out.stats
    assert isinstance(stats, EarlyExitStats)
    depths = [d for row in stats.token_depths for d in row]
    assert len(depths) == stats.decoded_tokens
    assert min(depths) < LAYERS and stats.early_exit_rate > 0
    assert stats.decision_layer_applications == sum(depths)
    assert stats.decision_layer_applications < ref.stats.layer_applications
    assert stats.mean_exit_depth < LAYERS
    # Honest accounting: the shared cache still needs every layer for every slot.
    assert stats.fill_applications > 0
    assert stats.layer_applications >= ref.stats.layer_applications
    assert stats.to_dict()["early_exit_rate"] == stats.early_exit_rate


def test_softmax_exits_once_threshold_decays(llama):
    """A random tiny LM is never confident, but the CALM threshold decays with t."""
    ids, mask = left_padded((5,))
    kw = dict(strategy="early_exit", max_new_tokens=NEW, eos_token_id=None)
    flat = generate(llama, ids, mask, policy=get_policy("calm_softmax", threshold=0.0, tau=0.0),
                    **kw)
    assert flat.stats.early_exit_rate == 0.0  # lambda_t = 0.1 > any top-1 prob here
    decayed = get_policy("calm_softmax", threshold=0.0, tau=50.0, horizon=1.0)
    out = generate(llama, ids, mask, policy=decayed, **kw)
    assert out.stats.token_depths[0] == [1] * (NEW - 1)  # first exit, from t = 1 on
    top2 = get_policy("calm_top2", threshold=0.0, tau=50.0, horizon=1.0)
    assert generate(llama, ids, mask, policy=top2, **kw).stats.early_exit_rate == 1.0


@pytest.mark.parametrize("kv", ["recompute", "propagate"])
def test_recompute_cache_equals_full_recomputation(llama, kv):
    bb = ew.wrap_backbone(llama)
    ids, mask = left_padded()
    b = ids.shape[0]
    stats = EarlyExitStats("early_exit", bb.num_layers, drafted=[0] * b, accepted=[0] * b)
    session = DecodeSession(bb, ids, mask, NEW, set(), PAD, stats, keep_finished=True)
    policy = get_policy("calm_saturation", threshold=0.9, tau=0.0)
    early_exit_decode(session, resolve_exit_points(llama, bb, [1, 2]), policy, kv)
    depths = stats.token_depths
    assert any(d < LAYERS for row in depths for d in row)
    assert any(d == LAYERS for row in depths for d in row)  # ragged exits in the batch
    mismatched = 0
    for r in range(b):
        valid = session.mask[r].bool()
        tokens = session.slot_tokens[r][valid]
        ref = full_cache(llama, tokens[None])
        last_depth = depths[r][-1]  # the last fed slot is exact only below its exit depth
        for layer in range(bb.num_layers):
            mine = session.cache.layers[layer]
            theirs = ref.layers[layer]
            keys, values = mine.keys[r][:, valid], mine.values[r][:, valid]
            n = keys.shape[1] - (1 if layer >= last_depth else 0)
            if kv == "recompute":
                torch.testing.assert_close(keys[:, :n], theirs.keys[0][:, :n], atol=ATOL, rtol=1e-4)
                torch.testing.assert_close(
                    values[:, :n], theirs.values[0][:, :n], atol=ATOL, rtol=1e-4
                )
            else:
                mismatched += not torch.allclose(keys[:, :n], theirs.keys[0][:, :n], atol=ATOL)
    if kv == "propagate":
        assert mismatched > 0  # propagated K/V are approximations, so the check has teeth


def test_propagate_writes_the_exit_state_into_deeper_layers(llama):
    """CALM's propagation: a token that left at depth 1 gives every deeper layer the K/V of
    its frozen depth-1 state, v = v_proj(norm_l(h_1)); a bug writing them from zeros passed
    the mismatch check above."""
    bb = ew.wrap_backbone(llama)
    ids = torch.tensor([[5, 17, 42, 8, 9]])
    stats = EarlyExitStats("early_exit", bb.num_layers, drafted=[0], accepted=[0])
    session = DecodeSession(bb, ids, torch.ones_like(ids), 5, set(), PAD, stats,
                            keep_finished=True)
    early_exit_decode(session, resolve_exit_points(llama, bb, [1, 2]),
                      get_policy("static", exit=0), "propagate")
    assert all(d == 1 for d in stats.token_depths[0])
    tokens = session.slot_tokens[0][session.mask[0].bool()]
    with torch.no_grad():
        h1 = llama(input_ids=tokens[None], output_hidden_states=True).hidden_states[1][0]
        generated = slice(ids.shape[1], tokens.numel())
        for layer_index in range(1, bb.num_layers):
            layer = llama.model.layers[layer_index]
            want = layer.self_attn.v_proj(layer.input_layernorm(h1))  # (S, kv * head_dim)
            got = session.cache.layers[layer_index].values[0]  # (kv, S, head_dim)
            got = got.transpose(0, 1).reshape(got.shape[1], -1)
            torch.testing.assert_close(got[generated], want[generated], atol=1e-5, rtol=1e-4)


def test_calm_threshold_formula():
    t = torch.tensor([0.0, 5.0, 10.0])
    got = decayed_threshold(0.8, t, 10.0, 4.0)
    want = [min(1.0, 0.9 * 0.8 + 0.1 * math.exp(-4.0 * x / 10.0)) for x in t.tolist()]
    torch.testing.assert_close(got, torch.tensor(want))
    assert bool((decayed_threshold(1.0, t, 10.0, 0.0) == 1.0).all())
    policy = get_policy("calm_top2", threshold=0.5, tau=0.0)
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]]))
    exits, _ = policy.decide(0, 3, logits, policy.init_state(2))
    assert exits.tolist() == [False, False]  # gaps 0.5 / 0.05 vs lambda = 0.55
    soft = get_policy("calm_softmax", threshold=0.5, tau=0.0)  # CALM's softmax response: p1 - p2
    assert soft.decide(0, 3, logits, {})[0].tolist() == [False, False]
    assert get_policy("calm_softmax", threshold=0.4, tau=0.0).decide(0, 3, logits, {})[
        0].tolist() == [True, False]  # 0.5 > 0.46 > 0.05
    top1 = get_policy("calm_maxprob", threshold=0.5, tau=0.0)
    assert top1.decide(0, 3, logits, {})[0].tolist() == [True, False]  # 0.7 > 0.55 > 0.4


def test_bad_inputs_raise_clear_errors(llama):
    ids, mask = left_padded((4,))
    kw = dict(strategy="early_exit", max_new_tokens=2)
    with pytest.raises(ConfigError, match="kv mode"):
        generate(llama, ids, mask, policy=_never(), kv="copy", **kw)
    with pytest.raises(ConfigError, match="needs a policy"):
        generate(llama, ids, mask, **kw)
    with pytest.raises(ConfigError, match="exit_layers"):
        generate(llama, ids, mask, policy=_never(), exit_layers=[LAYERS], **kw)
    with pytest.raises(ConfigError, match="do_sample"):
        generate(llama, ids, mask, policy=_never(), do_sample=True, **kw)
    with pytest.raises(ConfigError, match="range"):
        get_policy("calm_softmax", threshold=1.5)
    with pytest.raises(ConfigError, match="tau"):
        get_policy("calm_top2", threshold=0.5, tau=-1.0)
    with pytest.raises(ConfigError, match="horizon"):
        get_policy("calm_saturation", threshold=0.5, horizon=0)

def test_saturation_without_hidden_states_uses_logits():
    sat = get_policy("calm_saturation", threshold=0.5, tau=0.0)
    logits = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    exits, state = sat.decide(0, 3, logits, sat.init_state(2))
    assert exits.tolist() == [False, False]  # nothing to compare with at the first exit
    exits, _ = sat.decide(1, 3, torch.tensor([[1.0, 2.0, 3.1], [3.0, -2.0, -1.0]]), state)
    assert exits.tolist() == [True, False]


# -- kv="skip": exited tokens' deeper layers are not run at their step ----------------------
class _Scripted(ew.ExitPolicy):
    """Exits at exit (argmax + t) % num_exits: mixed, per-row depths (full depth included) that
    depend only on the exits' argmax, so modes with exact K/V make the same decisions."""

    registered_name = "scripted"

    def decide(self, exit_index, num_exits, logits, state, labels=None):
        t = state["t"].long()
        return (logits.argmax(-1) + t) % num_exits == exit_index, state

    def grid(self, num_exits):
        return [0]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("lengths", [(6,), (7, 3, 5)])
def test_skip_never_exit_equals_greedy(family, lengths):
    model = tiny_lm(family)
    ids, mask = left_padded(lengths)
    ref = generate(model, ids, mask, max_new_tokens=NEW, eos_token_id=EOS)
    out = generate(model, ids, mask, strategy="early_exit", policy=_never(), kv="skip",
                   max_new_tokens=NEW, eos_token_id=EOS)
    assert torch.equal(out.sequences, ref.sequences)
    assert out.stats.layer_applications == ref.stats.layer_applications
    assert out.stats.sequential_layers == ref.stats.sequential_layers
    assert out.stats.fill_applications == 0 and out.stats.max_deferred == 0


@pytest.mark.parametrize("lengths", [(6,), (7, 3, 5)])
def test_skip_really_runs_fewer_blocks(llama, lengths):
    ids, mask = left_padded(lengths)
    kw = dict(strategy="early_exit", max_new_tokens=NEW, eos_token_id=None)
    first = get_policy("static", exit=0)  # every token exits at the first exit (depth 1)
    prop = generate(llama, ids, mask, policy=first, kv="propagate", **kw)
    skip = generate(llama, ids, mask, policy=first, kv="skip", **kw)
    assert skip.stats.token_depths == prop.stats.token_depths
    tokens = skip.stats.decoded_tokens
    assert all(d == 1 for row in skip.stats.token_depths for d in row)
    # Counted block runs (row x position): one block per token instead of all of them.
    assert prop.stats.layer_applications == LAYERS * tokens
    assert skip.stats.layer_applications == tokens
    assert skip.stats.layer_applications_per_token == 1.0
    assert prop.stats.layer_applications_per_token == LAYERS
    assert skip.stats.sequential_layers == skip.stats.iterations  # one block per step
    assert prop.stats.sequential_layers == LAYERS * prop.stats.iterations
    assert skip.stats.sequential_layers_per_token == 1.0
    assert skip.stats.fill_applications == 0  # nothing deeper ever read the skipped slots
    assert skip.stats.max_deferred == NEW - 1


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_skip_tokens_equal_recompute_with_mixed_exits(family):
    model = tiny_lm(family)
    ids, mask = left_padded((7, 3, 5))
    kw = dict(strategy="early_exit", policy=_Scripted(), max_new_tokens=12, eos_token_id=None)
    rec = generate(model, ids, mask, kv="recompute", **kw)
    skip = generate(model, ids, mask, kv="skip", **kw)
    depths = [d for row in skip.stats.token_depths for d in row]
    assert len(set(depths)) == LAYERS  # every exit and the full depth occur
    # Both attend to the full model's K/V of every earlier token: same tokens, same exits.
    assert torch.equal(skip.sequences, rec.sequences)
    assert skip.stats.token_depths == rec.stats.token_depths
    # Deferred slots were carried across steps and filled in parallel by a deeper step
    # (the scripted exits follow each model's argmax: on these families the run is known to
    # defer two slots at once; the others are checked for equality only).
    if family in ("llama", "qwen2", "gpt2", "mistral", "gemma", "gemma2"):
        assert skip.stats.max_deferred >= 2 and skip.stats.fill_applications > 0
    assert skip.stats.sequential_layers < rec.stats.sequential_layers
    assert skip.stats.layer_applications < rec.stats.layer_applications


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_skip_cache_equals_full_recomputation(family):
    model = tiny_lm(family)
    bb = ew.wrap_backbone(model)
    ids, mask = left_padded()
    b = ids.shape[0]
    stats = EarlyExitStats("early_exit", bb.num_layers, drafted=[0] * b, accepted=[0] * b)
    session = DecodeSession(bb, ids, mask, 11, set(), PAD, stats, keep_finished=True)
    early_exit_decode(session, resolve_exit_points(model, bb, None), _Scripted(), "skip")
    assert stats.fill_applications > 0
    slots = session.mask.shape[1]
    lengths = [session.cache.layers[layer].keys.shape[2] for layer in range(bb.num_layers)]
    # Slots still deferred at the end are a suffix, longer at deeper layers; layer 0 is full.
    assert lengths[0] == slots and lengths == sorted(lengths, reverse=True)
    if family in ("llama", "gpt2"):  # these runs end with an early exit (argmax-scripted)
        assert lengths[-1] < slots  # so its slot was never run deep
    for r in range(b):
        valid = session.mask[r].bool()
        ref = full_cache(model, session.slot_tokens[r][valid][None])
        for layer, n in enumerate(lengths):
            mine = session.cache.layers[layer]
            keep = valid[:n]
            m = int(keep.sum())  # every slot present in the cache is the full model's
            for got, want in ((mine.keys, ref.layers[layer].keys),
                              (mine.values, ref.layers[layer].values)):
                torch.testing.assert_close(
                    got[r][:, :n][:, keep], want[0][:, :m], atol=ATOL, rtol=1e-4
                )


def test_the_default_kv_mode_is_skip_in_the_api_as_on_the_command_line(llama):
    # the mode where exits save compute; the command line's default too (they differed)
    ids, mask = left_padded((6, 4))
    out = generate(llama, ids, mask, strategy="early_exit", max_new_tokens=NEW,
                   policy=get_policy("calm_softmax", threshold=0.0, tau=0.0), eos_token_id=None)
    assert out.stats.kv == "skip"
    assert out.stats.sequential_layers < NEW * LAYERS  # exits at the first point really skip
