"""Class ids must name the same classes in the model and in every dataset that says its class
names (an ImageFolder whose class set differs from the training folder's shifts every id)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

import exitwise as ew
from exitwise.analysis import collect_exit_logits
from exitwise.data.classes import check_class_names, dataset_class_names
from exitwise.errors import DataError
from exitwise.training import train


class Folder(Dataset):
    """What torchvision's ImageFolder offers: classes (sorted sub-folder names), targets."""

    def __init__(self, classes: list[str], n: int = 8) -> None:
        self.classes = classes
        self.targets = [i % len(classes) for i in range(n)]
        self.images = torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.images[i], self.targets[i]


TRAIN = ["Zebra", "apple", "car_10", "car_2"]


def test_class_names_are_found_through_subsets_and_loaders():
    folder = Folder(TRAIN)
    assert dataset_class_names(DataLoader(Subset(Subset(folder, [0, 1]), [0]))) == TRAIN
    assert dataset_class_names([(torch.zeros(1), 0)]) is None
    check_class_names(folder, TRAIN, "x")  # the same: fine
    check_class_names(folder, None, "x")  # nothing to compare with: fine
    with pytest.raises(DataError, match=r"from id 0 on.*lacks: \['Zebra'\]"):
        check_class_names(Folder(["apple", "car_10", "car_2", "dog"]), TRAIN, "evaluation")
    with pytest.raises(DataError, match="another order"):
        check_class_names(Folder(["apple", "Zebra", "car_10", "car_2"]), TRAIN, "evaluation")
    # names of another kind (an ImageNet folder's WordNet ids against a checkpoint's
    # id2label): nothing to compare, nothing refused
    check_class_names(Folder(["n01440764", "n01443537"]), ["tench", "goldfish"], "given")


def _model(label_names=None):
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()) for _ in range(2)]
    blocks[1][0] = nn.Conv2d(4, 4, 3, padding=1)
    backbone = ew.SequentialBackbone(blocks, example=torch.randn(1, 3, 8, 8))
    return ew.attach_exits(backbone, ew.ExitConfig(layers="all", head="mean", num_labels=4,
                                                   label_names=label_names))


def test_training_and_caching_refuse_a_folder_with_other_classes(tmp_path):
    shifted = Folder(["apple", "car_10", "car_2", "dog"])
    # the model's own names against the training folder's
    with pytest.raises(DataError, match="training dataset numbers its classes differently"):
        train(_model(TRAIN), shifted, output_dir=str(tmp_path / "a"), max_steps=1)
    # no names on the model: the evaluation folder is compared with the training folder
    with pytest.raises(DataError, match="evaluation dataset numbers its classes differently"):
        train(_model(), Folder(TRAIN), eval_dataset=shifted, output_dir=str(tmp_path / "b"),
              max_steps=1)
    with pytest.raises(DataError, match="given dataset"):
        collect_exit_logits(_model(TRAIN), DataLoader(shifted, batch_size=4), progress=False)
    cache = collect_exit_logits(_model(TRAIN), DataLoader(Folder(TRAIN), batch_size=4),
                                progress=False)
    assert cache.labels.tolist() == Folder(TRAIN).targets
