"""FREE's shallow-deep exit (``free_bmm``) driven by the early-exit decoder on a tiny Llama: the
(confidence, consistency) pairs the decoder reports equal the ones computed by hand from the
model's own forward over the final tokens, in every KV mode, and the threshold adapts."""

from __future__ import annotations

import pytest
import torch
from helpers.lmkit import EOS, LAYERS, left_padded, tiny_lm

from exitwise.generation import generate
from exitwise.policies import get_policy

SHALLOW = 2
NEW = 12


@pytest.fixture(scope="module")
def llama():
    model = tiny_lm("llama")
    with torch.no_grad():  # peaked distributions: confidences spread over [0, 1]
        model.lm_head.weight.mul_(30.0)
    return model


def reference_pairs(model, sequence: list[int], prompt_len: int) -> list[tuple[float, bool]]:
    """For every decoded step (the token at position p = prompt_len .. end-2 is fed and the
    next one chosen): (top-1 minus top-2 probability at the shallow exit, shallow argmax ==
    full model's argmax), from one plain forward over the whole final sequence."""
    ids = torch.tensor([sequence])
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        shallow = model.lm_head(model.model.norm(out.hidden_states[SHALLOW]))[0]
    deep = out.logits[0]
    pairs = []
    for p in range(prompt_len, len(sequence) - 1):
        top = torch.softmax(shallow[p].float(), -1).topk(2).values
        pairs.append((float(top[0] - top[1]), int(shallow[p].argmax()) == int(deep[p].argmax())))
    return pairs


def observed(policy) -> list[tuple[float, bool]]:
    conf = torch.cat(policy._conf).tolist() if policy._conf else []
    same = torch.cat(policy._consistent).tolist() if policy._conf else []
    return [(c, bool(s)) for c, s in zip(conf, same)]


def run(model, policy, kv, lengths=(6,)):
    ids, mask = left_padded(lengths)
    out = generate(model, ids, mask, strategy="early_exit", policy=policy, kv=kv,
                   exit_layers=[SHALLOW], max_new_tokens=NEW, eos_token_id=None)
    return ids, mask, out


def assert_pairs(got, want):
    assert len(got) == len(want)
    for (c, s), (c_ref, s_ref) in zip(got, want):
        assert c == pytest.approx(c_ref, abs=1e-4) and s == s_ref


def test_never_exit_equals_greedy_and_every_token_is_a_pair(llama):
    policy = get_policy("free_bmm", threshold=1.0, adaptive=False)
    ids, mask, out = run(llama, policy, "skip")
    ref = generate(llama, ids, mask, max_new_tokens=NEW, eos_token_id=None)
    assert torch.equal(out.sequences, ref.sequences)
    assert out.stats.early_exit_rate == 0.0
    seq = out.sequences[0].tolist()
    want = reference_pairs(llama, seq, ids.shape[1])
    assert len(want) == NEW - 1
    assert_pairs(observed(policy), want)
    assert any(s for _, s in want) and not all(s for _, s in want)  # both labels occur


@pytest.mark.parametrize("kv", ["skip", "recompute", "propagate"])
def test_exited_tokens_are_paired_once_their_deep_state_is_known(llama, kv):
    policy = get_policy("free_bmm", threshold=0.15, adaptive=False)
    ids, _, out = run(llama, policy, kv)
    depths = out.stats.token_depths[0]
    assert SHALLOW in depths and LAYERS in depths  # mixed exits
    want = reference_pairs(llama, out.sequences[0].tolist(), ids.shape[1])
    got = observed(policy)
    if kv == "propagate":  # an exited token's deep state is never computed: no pair
        want = [w for w, d in zip(want, depths) if d == LAYERS]
    elif kv == "recompute":  # the next step recomputes it; the last token may still wait
        want = want[: len(got)]
        assert len(got) >= len(depths) - 1
    else:  # skip: resolved by the next step that runs to the last layer
        last_deep = max(i for i, d in enumerate(depths) if d == LAYERS)
        want = want[: last_deep + 1]
    assert_pairs(got, want)


def test_threshold_adapts_between_calls_and_batches_work(llama):
    from exitwise.policies.free_bmm import BetaMixture

    policy = get_policy("free_bmm", threshold=0.5)
    run(llama, policy, "skip", lengths=(7, 3, 5))
    assert policy.estimated is None and policy.num_observed > 0  # the first call uses 0.5
    x, y = torch.cat(policy._conf), torch.cat(policy._consistent)
    _, _, second = run(llama, policy, "skip", lengths=(7, 3, 5))
    # the second call began with a fit on every pair of the first one
    assert policy.updates == 1
    assert policy.estimated == BetaMixture().fit(x, y).threshold()
    assert 0.3 <= policy.estimated <= 0.9 and policy.current_threshold == policy.estimated
    assert second.sequences.shape[0] == 3
    assert policy.num_observed > x.numel()


def test_eos_and_finished_rows(llama):
    ids, mask = left_padded((7, 3, 5))
    policy = get_policy("free_bmm", threshold=0.05)
    out = generate(llama, ids, mask, strategy="early_exit", policy=policy, kv="skip",
                   exit_layers=[SHALLOW], max_new_tokens=NEW, eos_token_id=EOS)
    assert out.sequences.shape[0] == 3 and policy.num_observed > 0
