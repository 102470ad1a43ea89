"""Bad input fails early with clear errors; evaluation, tables and the collator."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.trainkit import FAST, tiny_model, token_items
from torch.utils.data import IterableDataset

from exitwise.errors import ConfigError, DataError, InputError
from exitwise.training import (
    PaddingCollator,
    evaluate_exits,
    format_exit_table,
    get_strategy,
    train,
)


def test_label_out_of_range_is_rejected_before_training(tmp_path):
    items = token_items(8)
    items[3] = {**items[3], "labels": 2}
    with pytest.raises(InputError, match=r"outside \[0, 2\).*num_labels=2"):
        train(tiny_model(), items, output_dir=tmp_path, max_steps=1, **FAST)
    assert not (tmp_path / "stage-1").exists()


def test_label_out_of_range_in_a_stream_is_caught_per_batch(tmp_path):
    class Stream(IterableDataset):
        def __iter__(self):
            for item in token_items(8):
                yield {**item, "labels": 5}

    with pytest.raises(InputError, match=r"labels must be in \[0, 2\)"):
        train(tiny_model(), Stream(), output_dir=tmp_path, max_steps=1, **FAST)


def test_unknown_strategy_lists_the_registered_ones(tmp_path):
    with pytest.raises(ConfigError, match="exits_only, .*joint, .*two_stage"):
        train(tiny_model(), token_items(8), strategy="nope", output_dir=tmp_path, **FAST)
    with pytest.raises(ConfigError, match="bad options"):
        get_strategy("joint", wieghts="depth")


def test_bad_training_arguments(tmp_path):
    with pytest.raises(ConfigError, match="learning_rat"):
        train(tiny_model(), token_items(8), output_dir=tmp_path, learning_rat=1e-3)
    with pytest.raises(ConfigError, match="output_dir"):
        train(tiny_model(), token_items(8))
    with pytest.raises(ConfigError, match="remove_unused_columns"):
        train(tiny_model(), token_items(8), output_dir=tmp_path, remove_unused_columns=True)
    with pytest.raises(ConfigError, match="MultiExitModel"):
        train(torch.nn.Linear(2, 2), token_items(8), output_dir=tmp_path)


def test_collator_pads_to_the_longest_row():
    batch = PaddingCollator(pad_token_id=3)(
        [{"input_ids": [5, 6], "labels": 1}, {"input_ids": [7, 8, 9, 10], "labels": 0}]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 3, 3], [7, 8, 9, 10]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["labels"].tolist() == [1, 0]


def test_evaluate_exits_matches_a_manual_count():
    model = tiny_model()
    items = token_items(20, seed=7)
    accs = evaluate_exits(model, items, PaddingCollator(), batch_size=6, progress=False)
    batch = PaddingCollator()(items)
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch).logits
    expected = [float((x.argmax(-1) == labels).float().mean()) for x in logits]
    assert accs == pytest.approx(expected)
    assert len(accs) == model.num_exits


def test_format_exit_table():
    text = format_exit_table([0.5, 0.755, 0.9], [2, 4, 6])
    lines = text.splitlines()
    assert len(lines) == 4 and "accuracy" in lines[0]
    assert "75.50%" in lines[2] and lines[3].endswith("(final)") and " 6 " in lines[3]
    with pytest.raises(InputError):
        format_exit_table([0.5], [1, 2])


def test_format_exit_table_flags_dead_exits_with_a_fitting_hint():
    from exitwise.training.evaluate import ExitEvaluation

    # majority 0.40; an exit must beat it by the 0.5-point margin to be live
    ev = ExitEvaluation([0.402, 0.41, 0.9], "accuracy", 0.40)
    assert ev.dead == [0]
    text = format_exit_table(ev, [1, 2, 3], ["linear"])
    assert text.splitlines()[1].endswith("<- no better than a constant prediction")
    assert "1 exit(s) do not beat the majority class's 40.00%" in text
    assert "--head mean" in text
    # exits already on the mean head are not told to use it
    assert "--head mean" not in format_exit_table(ev, [1, 2, 3], ["mean"])
    assert "final exit is dead" not in text
    # a dead final exit: a frozen recipe may have kept an untrained classifier
    final_dead = ExitEvaluation([0.9, 0.95, 0.40], "accuracy", 0.40)
    assert "final exit is dead too" in format_exit_table(final_dead, [1, 2, 3], ["native"],
                                                         frozen_final=True)
    assert "final exit is dead" not in format_exit_table(final_dead, [1, 2, 3], ["linear"])


def test_train_reports_and_prints_per_exit_accuracy(tmp_path, capsys):
    items = token_items(32, seed=8)
    result = train(
        tiny_model(),
        items,
        items[:16],
        strategy="exits_only",
        output_dir=tmp_path,
        max_steps=2,
        **FAST,
    )
    assert len(result.exit_accuracies) == 4
    assert all(0.0 <= a <= 1.0 for a in result.exit_accuracies)
    assert result.table() in capsys.readouterr().out
    # The final model is saved in exitwise's own format and loads back.
    import exitwise as ew

    assert (result.saved_to / "exit_config.json").is_file()
    loaded = ew.MultiExitModel.from_pretrained(
        result.saved_to, backbone=tiny_model().backbone.model
    )
    for a, b in zip(loaded.heads.state_dict().values(), result.model.heads.state_dict().values()):
        assert torch.equal(a, b)


def test_periodic_evaluation_logs_per_exit_accuracy(tmp_path):
    from transformers import TrainerCallback

    class Metrics(TrainerCallback):
        def __init__(self):
            self.seen = []

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            self.seen.append((state.global_step, metrics))

    items = token_items(32, seed=9)
    cb = Metrics()
    args = {
        **FAST,
        "eval_strategy": "steps",
        "eval_steps": 2,
        "save_strategy": "steps",
        "save_steps": 2,
        "load_best_model_at_end": True,
        "metric_for_best_model": "accuracy",
    }
    result = train(
        tiny_model(),
        items,
        items[:16],
        strategy="joint",
        output_dir=tmp_path,
        callbacks=[cb],
        max_steps=4,
        save_final=False,
        **args,
    )
    assert [step for step, _ in cb.seen] == [2, 4]
    metrics = cb.seen[-1][1]
    assert {f"eval_exit{k}_accuracy" for k in range(4)} <= set(metrics)
    assert metrics["eval_accuracy"] == metrics["eval_exit3_accuracy"]
    assert len(result.exit_accuracies) == 4
    # load_best_model_at_end restored the best checkpoint's weights (safetensors, strict).
    import json

    from safetensors.torch import load_file

    state = json.loads((tmp_path / "stage-1" / "checkpoint-4" / "trainer_state.json").read_text())
    best = load_file(str(Path(state["best_model_checkpoint"]) / "model.safetensors"))
    own = result.model.state_dict()
    assert all(torch.equal(t, own[n]) for n, t in best.items())


def test_image_label_pairs_train_as_torchvision_datasets_give_them(tmp_path):
    # a torchvision dataset yields (image, label) pairs: read as pixel_values and labels, as
    # the logit cache reads such batches; a label out of range is still caught up front
    from torch import nn

    import exitwise as ew

    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Conv2d(c, 4, 3, padding=1), nn.ReLU()) for c in (1, 4)]
    model = ew.attach_exits(ew.SequentialBackbone(blocks, example=torch.randn(1, 1, 6, 6)),
                            ew.ExitConfig(layers="all", head="sdn", num_labels=3))
    pairs = [(torch.randn(1, 6, 6), i % 3) for i in range(8)]
    batch = PaddingCollator()(pairs[:4])
    assert set(batch) == {"pixel_values", "labels"} and batch["pixel_values"].shape == (4, 1, 6, 6)
    assert batch["labels"].tolist() == [0, 1, 2, 0]
    result = train(model, pairs, strategy="joint", output_dir=tmp_path / "ok", max_steps=2,
                   save_final=False, **FAST)
    assert result.stages[-1].global_step == 2
    with pytest.raises(InputError, match="label"):
        train(model, pairs + [(torch.randn(1, 6, 6), 7)], strategy="joint",
              output_dir=tmp_path / "bad", max_steps=1, save_final=False, **FAST)
    with pytest.raises(DataError, match="pairs"):
        PaddingCollator()(["just a string"])


def _tiny_cnn(head: str = "sdn", **head_kwargs):
    from torch import nn

    import exitwise as ew

    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Conv2d(c, 4, 3, padding=1), nn.ReLU()) for c in (1, 4, 4)]
    return ew.attach_exits(ew.SequentialBackbone(blocks, example=torch.randn(1, 1, 6, 6)),
                           ew.ExitConfig(layers="all", head=head, num_labels=3,
                                         head_kwargs=head_kwargs))


class _Folder(torch.utils.data.Dataset):
    """Like torchvision's ImageFolder: ``targets`` beside items that cost a decode each."""

    def __init__(self, n: int, bad: int | None = None) -> None:
        self.targets = [i % 3 for i in range(n)]
        if bad is not None:
            self.targets[-1] = bad
        self.reads = 0

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        self.reads += 1
        return torch.randn(1, 6, 6), self.targets[i]


def test_labels_are_read_from_targets_not_by_decoding_every_item(tmp_path):
    # train() decoded (and augmented) every image of a folder before the first step
    folder = _Folder(200)
    train(_tiny_cnn(), folder, strategy="joint", output_dir=tmp_path / "a", max_steps=1,
          save_final=False, **FAST)
    assert folder.reads <= 2 * FAST["per_device_train_batch_size"]  # the step's batch only
    with pytest.raises(InputError, match="label"):
        train(_tiny_cnn(), _Folder(200, bad=9), strategy="joint", output_dir=tmp_path / "b",
              max_steps=1, save_final=False, **FAST)
    subset = torch.utils.data.Subset(_Folder(200, bad=9), list(range(150, 200)))
    with pytest.raises(InputError, match="label"):  # a Subset reads its parent's targets
        train(_tiny_cnn(), subset, strategy="joint", output_dir=tmp_path / "c", max_steps=1,
              save_final=False, **FAST)


def test_an_hf_dataset_with_a_transform_trains(tmp_path):
    # with_transform(...) returning pixel_values/labels made the label scan fail on 'label'
    # (and run the transform on every row)
    datasets = pytest.importorskip("datasets")
    calls = []

    def transform(batch):
        calls.append(len(batch["label"]))
        return {"pixel_values": [torch.randn(1, 6, 6) for _ in batch["label"]],
                "labels": batch["label"]}

    ds = datasets.Dataset.from_dict({"label": [i % 3 for i in range(40)]}).with_transform(
        transform)
    train(_tiny_cnn(), ds, strategy="joint", output_dir=tmp_path, max_steps=1,
          save_final=False, **FAST)
    assert sum(calls) <= 2 * FAST["per_device_train_batch_size"]


def test_a_one_row_last_batch_is_dropped_where_batch_norm_would_fail(tmp_path):
    # IMTA's collaboration layer (BatchNorm1d) failed on an epoch's one-row last batch
    model = _tiny_cnn("cascade", base="sdn", combine="isc")
    pairs = [(torch.randn(1, 6, 6), i % 3) for i in range(17)]  # 16 + 1
    result = train(model, pairs, strategy="joint", output_dir=tmp_path, num_train_epochs=1,
                   save_final=False, **FAST)
    assert result.stages[-1].global_step == 1


def test_a_one_row_last_batch_is_dropped_for_a_batch_norm_on_a_one_by_one_map(tmp_path):
    # a ResNet's last stage at 32 x 32 is a 1 x 1 map: BatchNorm2d failed on the last row
    from torch import nn

    import exitwise as ew

    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()),
              nn.Sequential(nn.Conv2d(4, 4, 6), nn.BatchNorm2d(4), nn.ReLU())]  # 6x6 -> 1x1
    model = ew.attach_exits(ew.SequentialBackbone(blocks, example=torch.randn(1, 1, 6, 6)),
                            ew.ExitConfig(layers="all", head="linear", num_labels=3))
    pairs = [(torch.randn(1, 6, 6), i % 3) for i in range(17)]  # 16 + 1
    result = train(model, pairs, strategy="joint", output_dir=tmp_path, num_train_epochs=1,
                   save_final=False, **FAST)
    assert result.stages[-1].global_step == 1


@pytest.mark.parametrize("strategy, frozen", [("exits_only", False), ("ztw", True)])
def test_the_report_says_the_own_classifier_was_frozen_only_when_it_was(tmp_path, strategy,
                                                                         frozen):
    # exits_only trains every head, the network's own classifier included; its report said
    # that classifier had been kept frozen
    from torch import nn

    import exitwise as ew

    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Conv2d(c, 4, 3, padding=1), nn.ReLU()) for c in (1, 4)]
    classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    backbone = ew.SequentialBackbone(blocks, example=torch.randn(1, 1, 6, 6),
                                     classifier=classifier)
    model = ew.attach_exits(backbone, ew.ExitConfig(layers="all", head="sdn"))
    assert model.heads[-1].registered_name == "native"
    before = classifier[2].weight.detach().clone()
    pairs = [(torch.randn(1, 6, 6), i % 3) for i in range(16)]
    result = train(model, pairs, strategy=strategy, output_dir=tmp_path, max_steps=2,
                   save_final=False, **FAST)
    assert result.frozen_final is frozen
    assert torch.equal(classifier[2].weight, before) is frozen


def test_images_of_several_sizes_or_pil_images_are_clear_errors():
    pytest.importorskip("PIL")
    from PIL import Image

    sizes = [(torch.randn(3, 6, 6), 0), (torch.randn(3, 8, 6), 1)]
    with pytest.raises(DataError, match="different shapes.*resize"):
        PaddingCollator()(sizes)
    pil = [(Image.new("RGB", (6, 6)), 0), (Image.new("RGB", (6, 6)), 1)]
    with pytest.raises(DataError, match="PIL image.*ToTensor"):
        PaddingCollator()(pil)


def test_a_raw_text_column_beside_the_tokens_is_left_out_of_batches(tmp_path):
    # datasets' map(tokenize) keeps "sentence": the collator made a tensor of it and failed
    items = [dict(it, sentence=f"row {i}", words=["a", "b"]) for i, it in
             enumerate(token_items(16, seed=3))]
    batch = PaddingCollator()(items[:4])
    assert "sentence" not in batch and "words" not in batch and "input_ids" in batch
    result = train(tiny_model(), items, strategy="joint", output_dir=tmp_path, max_steps=1,
                   save_final=False, **FAST)
    assert result.stages[-1].global_step == 1
    with pytest.raises(DataError, match="not something a tensor"):  # text labels still fail
        PaddingCollator()([{"input_ids": [1, 2], "labels": "pos"}])
