"""FastBERT (``training/fastbert.py``, ``policies/fastbert.py``, ``heads/fastbert.py``): the
self-distillation loss and the speed rule against values computed by hand, the student
classifier reading every real token, and the whole method end to end on a tiny BERT."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.trainkit import FAST, tiny_model, token_items

import exitwise as ew
from exitwise.analysis import collect_exit_logits, replay
from exitwise.outputs import ExitOutputs
from exitwise.training import PaddingCollator, train
from exitwise.training.fastbert import self_distillation_loss, teacher_loss


def softmax(v):
    z = sum(math.exp(x) for x in v)
    return [math.exp(x) / z for x in v]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def test_self_distillation_loss_by_hand():
    """sum over students of KL(p_teacher || p_student), batch mean, labels never read."""
    s1 = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]])
    s2 = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 3.0]])
    teacher = torch.tensor([[0.0, 2.0, 1.0], [1.0, 0.0, 0.0]])
    outputs = ExitOutputs(logits=[s1, s2, teacher])
    want = 0.0
    for student in (s1, s2):
        want += sum(kl(softmax(t.tolist()), softmax(s.tolist()))
                    for s, t in zip(student, teacher)) / 2
    assert float(self_distillation_loss(outputs, None)) == pytest.approx(want, rel=1e-6)
    assert float(self_distillation_loss(outputs, torch.tensor([0, 2]))) == pytest.approx(want)
    # the teacher only gives targets
    teacher.requires_grad_(True)
    s1.requires_grad_(True)
    self_distillation_loss(ExitOutputs(logits=[s1, s2, teacher])).backward()
    assert teacher.grad is None and s1.grad is not None
    ce = float(teacher_loss(outputs, torch.tensor([1, 0])).detach())
    want_ce = -(math.log(softmax([0.0, 2.0, 1.0])[1]) + math.log(softmax([1.0, 0.0, 0.0])[0])) / 2
    assert ce == pytest.approx(want_ce, rel=1e-6)


def test_speed_rule_is_normalized_entropy_below_the_speed():
    """Uncertainty = entropy / log C: [0.9, 0.1] gives 0.469 (C = 2); uniform gives 1 and,
    the rule being strict, never exits, even at speed 1."""
    u = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1)) / math.log(2)
    logits = torch.tensor([[math.log(0.9), math.log(0.1)], [0.0, 0.0]])
    decide = lambda speed: ew.get_policy("fastbert", speed=speed).decide(  # noqa: E731
        0, 3, logits, {})[0].tolist()
    assert decide(u + 1e-4) == [True, False]
    assert decide(u - 1e-4) == [False, False]
    assert decide(1.0) == [True, False]
    assert decide(0.0) == [False, False]
    uniform4 = torch.zeros(1, 4)
    assert not ew.get_policy("fastbert", speed=1.0).decide(0, 3, uniform4, {})[0].item()
    with pytest.raises(ew.ConfigError, match="speed"):
        ew.get_policy("fastbert", speed=1.5)


def test_student_classifier_reads_every_real_token_and_ignores_padding():
    torch.manual_seed(0)
    head = ew.build_head("fastbert", 16, 3, dropout=0.0).eval()
    hidden = torch.randn(2, 5, 16)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    base = head(hidden, mask)
    changed = hidden.clone()
    changed[:, 2] += 1.0  # a real token that is not the first
    assert not torch.allclose(head(changed, mask), base)  # unlike a [CLS]-only head
    padded = hidden.clone()
    padded[1, 3:] = 100.0
    torch.testing.assert_close(head(padded, mask)[1], base[1])


def test_fastbert_end_to_end_teacher_kept_students_distilled(tmp_path):
    items = token_items(96, seed=0)
    model = tiny_model(head="fastbert", head_kwargs={"width": 32})
    result = train(model, items, strategy="fastbert", output_dir=tmp_path, max_steps=30,
                   save_final=False, **FAST)
    assert [s.name for s in result.stages] == ["stage-1", "stage-2"]
    model.eval()
    batch = PaddingCollator()(items[:32])
    labels = batch.pop("labels")
    with torch.no_grad():
        out = model(**batch)
    # the students learned the teacher's predictions, without reading a label in stage 2
    teacher_pred = out.logits[-1].argmax(-1)
    agree = [float((z.argmax(-1) == teacher_pred).float().mean()) for z in out.logits[:-1]]
    assert agree[-1] >= 0.75, agree
    assert float((teacher_pred == labels).float().mean()) > 0.75
    # exit by the speed rule, at runtime as in replay
    loader = [PaddingCollator()(items[s : s + 16]) for s in range(0, 96, 16)]
    cache = collect_exit_logits(model, loader)
    policy = ew.get_policy("fastbert", speed=0.5)
    offline = replay(policy, cache, model.temperatures)
    run = torch.cat([model.early_exit(policy, **{k: v for k, v in b.items() if k != "labels"})
                     .exit_index for b in loader])
    assert torch.equal(run, offline.exit_index)
    with pytest.raises(ew.ConfigError, match="classification"):
        train(tiny_model(num_labels=1), [dict(i, labels=0.5) for i in items[:8]],
              strategy="fastbert", output_dir=tmp_path / "reg", max_steps=1, **FAST)
