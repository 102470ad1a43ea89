"""ModelCascade: complete models of increasing size, each used at full depth (CascadeBERT,
Li et al., Findings of EMNLP 2021).

    small, full = cascade_members("path/to/minilm", depths=(2, None), num_labels=2)
    ... train ``small`` with strategy "cascadebert" and ``full`` with "joint" ...
    cascade = ModelCascade([small, full], policy=0.9)
    res = cascade.run(**batch)            # res.member (B,), res.flops (B,), res.logits (B, C)
    cascade.save_pretrained("casc")       # member-0/, member-1/, cascade.json

The members are :class:`~exitwise.model.MultiExitModel`\\ s; :meth:`ModelCascade.run` executes
them with :func:`exitwise.runtime.cascade.run_cascade` (later members run on the rows the
policy did not stop, only); :mod:`exitwise.analysis.cascade` caches their outputs and replays
any policy offline with the same decisions. Saving writes one ordinary model folder per member
and a JSON manifest; nothing is pickled.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .backbones.hf_encoder import base_model_of, truncate_encoder
from .config import ExitConfig
from .errors import CheckpointError, ConfigError, InputError
from .model import MultiExitModel, attach_exits
from .policies.base import ExitPolicy, policy_from_dict
from .runtime.cascade import CascadeResult, PolicySpec, cascade_policy, run_cascade
from .temperatures import temperature_list

MANIFEST_NAME = "cascade.json"
MANIFEST_FORMAT = "exitwise-model-cascade"
MANIFEST_VERSION = 1


class ModelCascade(nn.Module):
    """Complete models of increasing size, run one after another on the rows still unsure.

    members: trained :class:`MultiExitModel`\\ s, cheapest first, each used at full depth
        (its final exit); the same number of outputs (and class names) for all, and one
        tokenizer for all.
    policy: optional default exit policy (or threshold(s), see
        :func:`~exitwise.runtime.cascade.cascade_policy`), saved with the cascade and used
        when :meth:`run` gets none.
    """

    def __init__(self, members: Sequence[MultiExitModel], policy: PolicySpec = None) -> None:
        super().__init__()
        members = list(members)
        if not members:
            raise ConfigError("a model cascade needs at least one member")
        for m, member in enumerate(members):
            if not isinstance(member, MultiExitModel):
                raise ConfigError(f"cascade member {m} is a {type(member).__name__}, not a "
                                  "MultiExitModel (wrap it with exitwise.attach_exits)")
        first = members[0]
        for m, member in enumerate(members[1:], start=1):
            if member.num_labels != first.num_labels:
                raise ConfigError(
                    f"cascade members must predict the same outputs: member 0 has "
                    f"{first.num_labels} labels, member {m} has {member.num_labels}")
            names, own = first.config.label_names, member.config.label_names
            if names and own and list(names) != list(own):
                raise ConfigError(f"cascade member {m} names its classes {own}, member 0 "
                                  f"{names}: the members must share one label order")
        self.members: nn.ModuleList = nn.ModuleList(members)
        self.policy: ExitPolicy | None = (
            None if policy is None else cascade_policy(policy, len(members)))
        if self.policy is not None:
            self.policy.check_task(self.task)

    # -- basic facts ------------------------------------------------------------------------
    @property
    def num_members(self) -> int:
        return len(self.members)

    @property
    def num_labels(self) -> int:
        return self.members[0].num_labels

    @property
    def task(self) -> str:
        return self.members[0].task

    @property
    def member_layers(self) -> list[int]:
        """Blocks of each member."""
        return [int(m.backbone.num_layers) for m in self.members]

    @property
    def cumulative_layers(self) -> list[int]:
        """Blocks a row has run when it leaves at member m (members 0..m)."""
        out, total = [], 0
        for n in self.member_layers:
            total += n
            out.append(total)
        return out

    @property
    def temperatures(self) -> torch.Tensor:
        """(M,) each member's final-exit temperature (its logits are divided by it)."""
        return torch.stack([m.temperatures[-1].detach().cpu() for m in self.members])

    def set_temperatures(self, temperatures: torch.Tensor | Sequence[float]) -> None:
        """Write (M,) temperatures (e.g. ``calibration.fit_temperatures`` of a cascade cache)
        into the members' final exits."""
        temps = temperature_list(temperatures, self.num_members)
        with torch.no_grad():
            for member, t in zip(self.members, temps):
                member.temperatures[-1] = t

    # -- inference --------------------------------------------------------------------------
    def run(
        self,
        policy: PolicySpec = None,
        labels: torch.Tensor | None = None,
        count_flops: bool = True,
        profile: bool = False,
        **inputs: Any,
    ) -> CascadeResult:
        """Run the cascade on one batch (see :func:`~exitwise.runtime.cascade.run_cascade`).

        policy: an ExitPolicy, a confidence threshold, or one threshold per member boundary;
            None: the cascade's stored policy.
        """
        if policy is None:
            if self.policy is None:
                raise InputError("give a policy or a confidence threshold (this cascade "
                                 "stores none)")
            chosen = self.policy
        else:
            chosen = cascade_policy(policy, self.num_members)
        return run_cascade(list(self.members), chosen, labels=labels, count_flops=count_flops,
                           profile=profile, **inputs)

    # -- persistence ------------------------------------------------------------------------
    def save_pretrained(self, save_dir: str | Path, save_backbone: bool = True) -> Path:
        """A folder with one ``member-<m>/`` per member (each a MultiExitModel folder) and a
        JSON manifest ``cascade.json``; nothing pickled.

        save_backbone: write each member's backbone (default True: a truncated member cannot
            be rebuilt from its checkpoint's name).
        """
        out = Path(save_dir)
        out.mkdir(parents=True, exist_ok=True)
        folders = []
        for m, member in enumerate(self.members):
            name = f"member-{m}"
            member.save_pretrained(out / name, save_backbone=save_backbone)
            folders.append(name)
        manifest = {
            "format": MANIFEST_FORMAT,
            "format_version": MANIFEST_VERSION,
            "members": folders,
            "member_layers": self.member_layers,
            "num_labels": self.num_labels,
            "task": self.task,
            "policy": None if self.policy is None else self.policy.to_dict(),
        }
        (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
        return out

    @classmethod
    def from_pretrained(cls, load_dir: str | Path, **backbone_kwargs: Any) -> ModelCascade:
        """Load a cascade written by :meth:`save_pretrained` (in eval mode)."""
        src = Path(load_dir)
        path = src / MANIFEST_NAME
        if not path.is_file():
            raise CheckpointError(f"{path} not found: not an exitwise model cascade folder")
        meta = json.loads(path.read_text())
        if meta.get("format") != MANIFEST_FORMAT:
            raise CheckpointError(f"{path} is not an exitwise model-cascade manifest")
        if int(meta.get("format_version", 0)) > MANIFEST_VERSION:
            raise CheckpointError(f"{path} has format version {meta['format_version']}; this "
                                  f"exitwise reads up to {MANIFEST_VERSION}")
        members = [MultiExitModel.from_pretrained(src / name, **backbone_kwargs)
                   for name in meta["members"]]
        layers = [int(m.backbone.num_layers) for m in members]
        if "member_layers" in meta and layers != list(meta["member_layers"]):
            raise CheckpointError(f"the members loaded with {layers} blocks, the manifest "
                                  f"says {meta['member_layers']}")
        policy = meta.get("policy")
        return cls(members, None if policy is None else policy_from_dict(policy)).eval()


def cascade_members(
    backbone: str | Path | nn.Module,
    depths: Sequence[int | None],
    **exit_config: Any,
) -> list[MultiExitModel]:
    """Untrained cascade members cut from one Hugging Face encoder: member m keeps the first
    ``depths[m]`` blocks (None: all of them) and gets one exit, at its last block.

    backbone: the encoder (a model, copied per member) or its name / folder (loaded once per
        member with ``AutoModel``).
    depths: strictly increasing, e.g. ``(2, None)`` for CascadeBERT's 2-layer model then the
        full model.
    exit_config: :class:`~exitwise.config.ExitConfig` keywords (``num_labels``, ``head`` ...);
        ``layers`` is set here (each member's last block).
    """
    if "layers" in exit_config:
        raise ConfigError("cascade members exit only at their last block; do not give layers")
    depths = list(depths)
    if not depths:
        raise ConfigError("give at least one member depth")
    models: list[MultiExitModel] = []
    previous = 0
    for m, depth in enumerate(depths):
        if isinstance(backbone, nn.Module):
            model = copy.deepcopy(backbone)
        else:
            from transformers import AutoModel

            model = AutoModel.from_pretrained(str(backbone))
        total = int(base_model_of(model).config.num_hidden_layers)
        keep = total if depth is None else int(depth)
        if keep <= previous:
            raise ConfigError(f"member depths must increase (cheapest member first); member "
                              f"{m} keeps {keep} blocks after {previous}")
        if keep > total:
            raise ConfigError(f"member {m} asks for {keep} blocks; the encoder has {total}")
        if keep < total:
            truncate_encoder(model, keep)
        previous = keep
        models.append(attach_exits(model, ExitConfig(layers=[keep], **exit_config)))
    return models


__all__ = ["ModelCascade", "cascade_members"]
