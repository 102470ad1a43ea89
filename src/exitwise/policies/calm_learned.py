"""``calm_learned``: CALM's learned early-exit classifier (Schuster et al., 2022, sec. 3.5).

At exit depth d a small classifier reads the token's hidden state h_d (B, H) and predicts the
probability that the exit's top-1 token is *consistent* with the full model's top-1 token
(CALM's token-level consistency oracle: label 1 iff argmax exit == argmax final). The token
exits when that probability exceeds CALM's position-decayed threshold lambda_t
(see :mod:`.calm_base`), like the other ``calm_*`` measures.

The classifier (:class:`CalmExitClassifier`, one linear or 2-layer MLP probe per exit depth)
is trained on a frozen model by
:mod:`exitwise.lm.objectives.calm` (``ew.tune_exits(lm, texts, "calm")``) and saved to a folder
(``calm_classifier.json`` + ``calm_classifier.safetensors``, no pickle). It is the policy's
own parameter, like its threshold, so the policy takes it as ``classifier=``: a folder path
(JSON-friendly, so ``to_dict`` / ``policy_from_dict`` round-trip) or a loaded object.

Hidden states come from the early-exit decoder (``needs_hidden``): ``state["hidden"]`` (B, H)
and ``state["exit_depth"]`` (B,) the depth d (see
:func:`exitwise.generation.exit_points.check_exit`). Where only logits exist (the
classification executor, offline replay of cached logits) the classifier cannot run: the
score is -1 and no row exits before the last exit. Without a classifier, hidden states raise
a clear :class:`~exitwise.errors.ConfigError`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError, InputError
from .base import register_policy
from .calm_base import CalmPolicy

CONFIG_NAME, WEIGHTS_NAME = "calm_classifier.json", "calm_classifier.safetensors"
KINDS = ("linear", "mlp")


class ConsistencyProbe(nn.Module):
    """One exit's classifier: standardized h (B, H) -> consistency logit (B,).

    ``mean`` / ``std`` (H,) are buffers fitted on the training states (raw residual streams of
    LMs have a few huge dimensions; standardizing keeps a linear probe well conditioned).
    """

    def __init__(self, hidden_size: int, kind: str = "linear", mlp_hidden: int | None = None):
        super().__init__()
        if kind not in KINDS:
            raise ConfigError(f"classifier kind must be one of {', '.join(KINDS)}; got {kind!r}")
        self.register_buffer("mean", torch.zeros(hidden_size))
        self.register_buffer("std", torch.ones(hidden_size))
        if kind == "linear":
            self.net: nn.Module = nn.Linear(hidden_size, 1)
        else:
            width = int(mlp_hidden or hidden_size)
            self.net = nn.Sequential(
                nn.Linear(hidden_size, width), nn.GELU(), nn.Linear(width, 1)
            )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = (hidden.float() - self.mean) / self.std
        return self.net(x)[..., 0]


class CalmExitClassifier(nn.Module):
    """Per-exit consistency classifiers, keyed by exit depth (blocks run, 1..L-1).

    ``logit(hidden (B, H), depth) -> (B,)``; ``prob`` is its sigmoid. Float32 throughout,
    whatever the model's dtype (hidden states are cast).
    """

    def __init__(
        self,
        hidden_size: int,
        exit_layers: list[int],
        kind: str = "linear",
        mlp_hidden: int | None = None,
        model: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not exit_layers or not all(isinstance(d, int) and d >= 1 for d in exit_layers):
            raise ConfigError(f"exit_layers must be depths >= 1; got {exit_layers!r}")
        self.hidden_size = int(hidden_size)
        self.exit_layers = sorted(set(int(d) for d in exit_layers))
        self.kind = kind
        self.mlp_hidden = mlp_hidden
        self.model_info = dict(model or {})  # the backbone's describe(), for users to check
        self.probes = nn.ModuleDict(
            {str(d): ConsistencyProbe(hidden_size, kind, mlp_hidden) for d in self.exit_layers}
        )

    def probe(self, depth: int) -> ConsistencyProbe:
        key = str(int(depth))
        if key not in self.probes:
            raise ConfigError(
                f"the CALM classifier was trained for exits {self.exit_layers}, not depth "
                f"{int(depth)}; decode with exit_layers within those or retrain"
            )
        return self.probes[key]

    def logit(self, hidden: torch.Tensor, depth: int) -> torch.Tensor:
        if hidden.dim() != 2 or hidden.shape[-1] != self.hidden_size:
            raise InputError(
                f"the CALM classifier reads (batch, {self.hidden_size}) hidden states; got "
                f"{tuple(hidden.shape)}"
            )
        probe = self.probe(depth)
        if probe.mean.device != hidden.device:
            self.to(hidden.device)
        return probe(hidden)

    def prob(self, hidden: torch.Tensor, depth: int) -> torch.Tensor:
        return torch.sigmoid(self.logit(hidden, depth))

    # -- persistence: JSON + safetensors, no pickle -----------------------------------------
    def config_dict(self) -> dict[str, Any]:
        return {
            "hidden_size": self.hidden_size, "exit_layers": self.exit_layers, "kind": self.kind,
            "mlp_hidden": self.mlp_hidden, "model": self.model_info,
        }

    def save_pretrained(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(folder)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
        (path / CONFIG_NAME).write_text(json.dumps(self.config_dict(), indent=1))
        return path

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "CalmExitClassifier":
        from safetensors.torch import load_file

        path = Path(folder)
        if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
            raise CheckpointError(
                f"{path} holds no CALM classifier ({CONFIG_NAME} + {WEIGHTS_NAME}); train one "
                "with ew.tune_exits(lm, texts, ew.lm.CalmConfig(), output_dir=...)"
            )
        try:
            cfg = json.loads((path / CONFIG_NAME).read_text())
            out = cls(cfg["hidden_size"], cfg["exit_layers"], cfg.get("kind", "linear"),
                      cfg.get("mlp_hidden"), cfg.get("model"))
            out.load_state_dict(load_file(str(path / WEIGHTS_NAME), device="cpu"))
        except (KeyError, json.JSONDecodeError, RuntimeError) as err:
            raise CheckpointError(f"{path}: not a valid CALM classifier ({err})") from None
        return out.eval()


# Folder -> (mtime, classifier): a threshold sweep (with_param) does not reload the weights.
_LOADED: dict[str, tuple[int, CalmExitClassifier]] = {}


def load_classifier(folder: str | Path) -> CalmExitClassifier:
    path = Path(folder).resolve()
    stamp = (path / WEIGHTS_NAME).stat().st_mtime_ns if (path / WEIGHTS_NAME).is_file() else -1
    hit = _LOADED.get(str(path))
    if hit is None or hit[0] != stamp:
        hit = (stamp, CalmExitClassifier.from_pretrained(path))
        _LOADED[str(path)] = hit
    return hit[1]


@register_policy("calm_learned")
class CalmLearnedPolicy(CalmPolicy):
    """Exit when P(consistent | h_d) > lambda_t. ``classifier``: a folder written by
    :meth:`CalmExitClassifier.save_pretrained`, a :class:`CalmExitClassifier`, or None (then
    the policy can only run where no hidden states are given, and never exits there)."""

    needs_hidden = True

    def __init__(
        self,
        threshold: float = 0.9,
        tau: float = 4.0,
        horizon: float | None = None,
        classifier: str | Path | CalmExitClassifier | None = None,
    ) -> None:
        super().__init__(threshold=threshold, tau=tau, horizon=horizon)
        if isinstance(classifier, Path):
            classifier = str(classifier)
        if isinstance(classifier, str):
            self._clf: CalmExitClassifier | None = load_classifier(classifier)
        elif classifier is None or isinstance(classifier, CalmExitClassifier):
            self._clf = classifier
        else:
            raise ConfigError(
                "calm_learned: classifier must be a folder path or a CalmExitClassifier; got "
                f"{type(classifier).__name__}"
            )
        self.params["classifier"] = classifier

    @property
    def classifier(self) -> CalmExitClassifier | None:
        return self._clf

    def _depth(self, exit_index: int, num_exits: int, state: dict) -> int:
        """The exit depth: ``state["exit_depth"]`` (set by the decoder), else the
        ``exit_index``-th trained exit when the classifier covers exactly these exits."""
        assert self._clf is not None
        if "exit_depth" in state:
            depths = state["exit_depth"].unique()
            if depths.numel() != 1:
                raise InputError("calm_learned: rows of one call must share their exit depth")
            return int(depths[0])
        if len(self._clf.exit_layers) == num_exits - 1 and 0 <= exit_index < num_exits - 1:
            return self._clf.exit_layers[exit_index]
        raise ConfigError(
            "calm_learned: give state['exit_depth'] (the decoder does) - the classifier covers "
            f"exits {self._clf.exit_layers}, which do not match {num_exits - 1} exits"
        )

    def measure(self, logits, state):
        return -torch.ones(logits.shape[0], device=logits.device)  # no hidden: never exits

    def decide(self, exit_index, num_exits, logits, state, labels=None):
        if "hidden" not in state:
            return super().decide(exit_index, num_exits, logits, state, labels)
        self.check_logits(logits)
        if self._clf is None:
            raise ConfigError(
                "calm_learned needs its trained classifier: get_policy('calm_learned', "
                "threshold=..., classifier='path/to/folder') (train it with "
                "ew.tune_exits(lm, texts, ew.lm.CalmConfig(), output_dir=...))"
            )
        depth = self._depth(exit_index, num_exits, state)
        with torch.no_grad():
            score = self._clf.prob(state["hidden"], depth).to(logits.device)
        lam = self.threshold_at(state, logits.shape[0], logits.device)
        return score > lam, state

