"""MultiExitModel: a backbone with exit heads at chosen depths.

``forward`` returns every exit's logits (for training and for caching); ``early_exit`` runs
the real executor. Saving writes ``exit_config.json`` + ``exit_heads.safetensors`` (and the
backbone's own ``save_pretrained`` output in ``backbone/`` when it was fine-tuned); nothing is
pickled.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .backbones import Backbone, wrap_backbone
from .backbones.base import BackboneState, reference_output
from .config import ExitConfig
from .errors import ConfigError, InputError
from .heads import (
    HEADS,
    ExitHead,
    ExitScorer,
    GeometricEnsemble,
    SkipGate,
    build_gate,
    build_head,
    build_scorer,
    classifier_layer,
    feature_width,
    uses_past_states,
    uses_previous_logits,
)
from .labels import validate_labels
from .model_io import (  # the folder's file names stay importable from here
    BACKBONE_DIR,
    BACKBONE_WEIGHTS,
    CONFIG_NAME,
    FORMAT_VERSION,
    HEADS_NAME,
    load_model,
    save_calibration,
    save_model,
)
from .modes import for_inference
from .outputs import EarlyExitResult, ExitOutputs
from .policies.base import ExitPolicy, get_policy, policy_from_dict
from .runtime import run_early_exit
from .temperatures import same_temperatures


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``scale`` on the way back."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: Any) -> torch.Tensor:  # noqa: D102
        ctx.save_for_backward(torch.as_tensor(scale))
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # noqa: D102
        (scale,) = ctx.saved_tensors
        return grad * scale.to(grad.dtype), None


def scale_grad(x: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """``x`` unchanged, its gradient multiplied by ``scale`` (a float or a 0-d tensor)."""
    if not isinstance(scale, torch.Tensor) and float(scale) == 1.0:
        return x
    return _ScaleGrad.apply(x, scale)


class MultiExitModel(nn.Module):
    """A backbone plus one exit head per depth in ``exit_layers`` (the last is the final one).

    Attributes:
        backbone: the :class:`~exitwise.backbones.Backbone` adapter.
        exit_layers: depths (1-based) carrying exits, shallowest first.
        heads: one :class:`~exitwise.heads.ExitHead` per exit.
        temperatures: (num_exits,) buffer; calibrated logits are ``logits / temperatures[k]``.
        calibration: JSON-able dict of calibrated policy settings, saved with the heads.
        backbone_tuned: True once a training recipe updated backbone weights (then saving
            also writes the backbone).
    """

    def __init__(self, backbone: Backbone, config: ExitConfig) -> None:
        super().__init__()
        exit_layers = config.resolve_layers(backbone.num_layers, backbone)
        config = _keep_own_classifier(backbone, config, exit_layers)
        if config.num_labels is None:  # an LM exit predicts the next token over the vocabulary
            is_lm = config.head_name == "lm" and hasattr(backbone, "vocab_size")
            config = replace(config, num_labels=int(backbone.vocab_size) if is_lm else 2)
        self.backbone = backbone
        self.config = config
        self.exit_layers: list[int] = exit_layers
        config.check_depths(exit_layers)
        heads = []
        for k, depth in enumerate(self.exit_layers):
            name, options = config.head_for(k, self.exit_layers)
            if uses_past_states(HEADS.get(name)):  # it sizes its past and future by its place
                options = {**options, "exit_index": k, "num_exits": len(self.exit_layers)}
            if HEADS.get(name).needs_own_classifier and k < len(self.exit_layers) - 1:
                # one classifier shared by every exit (and unsaveable: shared tensors)
                raise ConfigError(
                    f"the {name!r} head is the network's own classifier, which only the final "
                    f"exit can be (final_head={name!r}); exit {k} at depth {depth} needs "
                    "another head")
            head = build_head(
                name, backbone.feature_dim(depth), config.num_labels, dropout=config.dropout,
                **options,
            )
            head.init_from_backbone(backbone)
            heads.append(head)
        widths = {h.in_features for h in heads if uses_past_states(h)}
        if len(widths) > 1:
            raise ConfigError(
                "heads that read the earlier exits' states need one feature width at every "
                f"such exit; this backbone's exits have widths {sorted(widths)}"
            )
        self.heads: nn.ModuleList = nn.ModuleList(heads)
        # Fresh heads live where the backbone does, in its precision (a bf16 model's features
        # would not multiply float32 weights); temperatures stay float32 (see temperatures.py).
        ref = next((p for p in backbone.parameters() if p.is_floating_point()), None)
        if ref is not None:
            self.heads.to(device=ref.device, dtype=ref.dtype)
        self.register_buffer("temperatures", torch.ones(
            len(heads), device=None if ref is None else ref.device))
        self.exit_lookup: dict[int, int] = {d: k for k, d in enumerate(self.exit_layers)}
        self.calibration: dict[str, Any] = {}
        self.backbone_tuned = False
        # ZTW's learned geometric ensemble over the exits (attach_ensemble); saved with the heads.
        self.ensemble: GeometricEnsemble | None = None
        # A learned per-row score at every exit that some policies read (attach_scorer).
        self.scorer: ExitScorer | None = None
        # A learned per-row decision to skip each block (attach_gate); obeyed by block_step.
        self.gate: SkipGate | None = None

    # -- basic facts ------------------------------------------------------------------------
    @property
    def num_exits(self) -> int:
        return len(self.heads)

    @property
    def num_labels(self) -> int:
        return self.config.num_labels

    @property
    def task(self) -> str:
        """"regression" for one output (Hugging Face's ``num_labels == 1``), else
        "classification"."""
        return "regression" if self.num_labels == 1 else "classification"

    @property
    def id2label(self) -> dict[int, str]:
        """Class names by id (``label_names``), or ``LABEL_i`` like Hugging Face."""
        names = self.config.label_names
        return {i: names[i] if names else f"LABEL_{i}" for i in range(self.num_labels)}

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in self.id2label.items()}

    def temperature_list(self) -> list[float]:
        return [float(t) for t in self.temperatures]

    def check_labels(self, labels: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Validate labels: (B,) integers in [0, num_labels), or (B,) finite numbers for a
        regression model."""
        return validate_labels(labels, self.num_labels, self.task, batch_size)

    # -- forward passes ---------------------------------------------------------------------
    def head_logits(
        self,
        k: int,
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        previous_logits: torch.Tensor | None = None,
        past: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Exit ``k``'s raw logits (B, C); heads that declare ``uses_previous_logits`` also get
        the raw logits of exit k-1 (None at the first exit). Heads that declare
        ``uses_past_states`` get ``past``, the (B, D) states the earlier such exits left, and
        their own state is appended to ``past`` in place (a caller keeps one list per batch,
        as it keeps ``previous_logits``). Every path that runs heads (forward, the executor,
        the logits cache) goes through here."""
        head = self.heads[k]
        if uses_past_states(head):
            past = [] if past is None else past
            own = head.exit_state(hidden, mask)
            out = head(hidden, mask, past=list(past), state=own)
            past.append(own)
            return out
        if uses_previous_logits(head):
            return head(hidden, mask, previous_logits=previous_logits)
        return head(hidden, mask)

    def forward(
        self,
        return_features: bool = False,
        grad_scales: Any = None,
        **inputs: Any,
    ) -> ExitOutputs:
        """Every exit's logits, raw (no temperature): ExitOutputs.logits[k] is (B, C).

        Accepts what the backbone takes (input_ids, attention_mask, ...); ``labels`` is
        ignored here (training recipes compute the losses).

        return_features: also fill ``ExitOutputs.features`` (per exit, the (B, D_k) input of
            its head's classifier layer).
        grad_scales: training only: per exit k a pair ``(head_path, trunk_path)`` of gradient
            multipliers (floats or 0-d tensors) at the point where exit k reads the backbone:
            the gradient exit k's head sends into the backbone is scaled by ``head_path``, the
            gradient the deeper blocks send back through that point by ``trunk_path``. The
            forward values do not change. IMTA's gradient equilibrium and Meta-GF's gradient
            fusion are such scalings.
        """
        inputs.pop("labels", None)
        if grad_scales is not None and len(grad_scales) != self.num_exits:
            raise InputError(f"{len(grad_scales)} grad_scales for {self.num_exits} exits")
        state = self.backbone.start(**inputs)
        logits: list[torch.Tensor] = []
        features: list[torch.Tensor | None] = []
        previous: torch.Tensor | None = None
        past: list[torch.Tensor] = []  # states of the earlier exits, for past-future heads
        scores: list[torch.Tensor] = []
        for i in range(self.backbone.num_layers):
            state, _ = self.block_step(i, state)
            k = self.exit_lookup.get(i + 1)
            if k is not None:
                trunk = state.hidden
                if grad_scales is not None:
                    state.hidden = scale_grad(trunk, grad_scales[k][0])
                hidden, mask = self.backbone.features(state)
                if return_features or self.scorer is not None:
                    out, feat = self.logits_and_feature(k, hidden, mask, previous, past)
                    features.append(feat)
                    if self.scorer is not None:
                        scores.append(self.scorer(k, feat, out))
                else:
                    out = self.head_logits(k, hidden, mask, previous, past)
                logits.append(out)
                previous = out
                if grad_scales is not None:
                    state.hidden = scale_grad(trunk, grad_scales[k][1])
        return ExitOutputs(logits=logits, features=features if return_features else None,
                           scores=scores if self.scorer is not None else None)

    def block_step(self, i: int, state: BackboneState
                   ) -> tuple[BackboneState, torch.Tensor | None]:
        """Block ``i`` on the batch: ``(new state, ran)``. Without a skip gate every row runs
        it (``ran`` None); with one (:meth:`attach_gate`) only the rows whose gate lets them in
        are computed, the others keep their state, and ``ran`` is (B,) bool. Every path that
        runs blocks (forward, the executor, the logits cache) goes through here."""
        if self.gate is None:
            return self.backbone.step(i, state), None
        hidden, mask = self.backbone.features(state)
        ran = ~self.gate.skip(i, hidden, mask)
        return self.backbone.step_rows(i, state, ran), ran

    def logits_and_feature(
        self, k: int, hidden: torch.Tensor, mask: torch.Tensor | None,
        previous: torch.Tensor | None, past: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Exit k's raw logits (B, C) and the input of its classifier layer (B, D_k) (caught by
        a forward pre-hook, so heads need no extra code to expose it; None without one)."""
        layer = classifier_layer(self.heads[k])
        if layer is None:
            return self.head_logits(k, hidden, mask, previous, past), None
        caught: list[torch.Tensor] = []
        handle = layer.register_forward_pre_hook(lambda _m, args: caught.append(args[0]))
        try:
            out = self.head_logits(k, hidden, mask, previous, past)
        finally:
            handle.remove()
        return out, (caught[-1] if caught else None)

    def attach_ensemble(self) -> GeometricEnsemble:
        """ZTW's geometric ensemble over this model's internal classifiers (every exit but the
        final one: ZTW builds no ensemble on the backbone's own head), created on first use."""
        if self.ensemble is None:
            device = self.temperatures.device
            self.ensemble = GeometricEnsemble(self.num_exits - 1, self.num_labels).to(device)
        return self.ensemble

    def attach_scorer(self, name: str, **options: Any) -> ExitScorer:
        """A learned per-exit score (:mod:`exitwise.heads.scorer`, e.g. ``"lte"``) read by
        policies that declare ``uses_scores``; created on first use (a second call with the
        same name returns the attached one)."""
        if self.scorer is not None:
            if self.scorer.registered_name != name:
                raise InputError(f"this model already has the {self.scorer.registered_name!r} "
                                 f"exit scorer; cannot attach {name!r} too")
            return self.scorer
        dims = [feature_width(h) for h in self.heads]
        device = self.temperatures.device
        self.scorer = build_scorer(name, dims, self.num_labels, **options).to(device)
        return self.scorer

    def attach_gate(self, name: str, **options: Any) -> SkipGate:
        """A learned skip gate in front of every block (:mod:`exitwise.heads.skip_gate`, e.g.
        ``"smartbert"``), obeyed by :meth:`block_step`; created on first use (a second call
        with the same name returns the attached one)."""
        if self.gate is not None:
            if self.gate.registered_name != name:
                raise InputError(f"this model already has the {self.gate.registered_name!r} "
                                 f"skip gate; cannot attach {name!r} too")
            return self.gate
        # A block that can be skipped keeps the state's width: block i's input is as wide as
        # its output (and block 0's as the first block's output).
        dims = [self.backbone.feature_dim(max(i, 1)) for i in range(self.backbone.num_layers)]
        self.gate = build_gate(name, dims, **options).to(self.temperatures.device)
        return self.gate

    def exit_score(self, k: int, hidden: torch.Tensor, mask: torch.Tensor | None,
                   previous: torch.Tensor | None, past: list[torch.Tensor] | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exit k's raw logits (B, C) and its scorer's score (B,) (the executor's and the
        logits cache's one path to a score)."""
        if self.scorer is None:
            raise InputError("this model has no exit scorer (attach_scorer / a strategy that "
                             "trains one, e.g. berxit)")
        logits, feature = self.logits_and_feature(k, hidden, mask, previous, past)
        return logits, self.scorer(k, feature, logits)

    def early_exit(
        self,
        policy: ExitPolicy | str | None = None,
        labels: torch.Tensor | None = None,
        profile: bool = False,
        count_flops: bool = True,
        **inputs: Any,
    ) -> EarlyExitResult:
        """Real early exit on one batch with ``policy`` (an object, or the name of a
        calibrated policy saved with this model). See :func:`exitwise.runtime.run_early_exit`.

        ``labels`` (also when it arrives inside a batch dict) are validated against
        ``num_labels``; only label-needing policies (the oracle) use them.
        """
        if policy is None or isinstance(policy, str):
            policy = self.calibrated_policy(policy)
        elif not isinstance(policy, ExitPolicy):
            raise ConfigError(
                f"policy must be an ExitPolicy (ew.get_policy('entropy', threshold=0.3)), the "
                f"name of a calibrated one, or None; got {type(policy).__name__}"
                + (": build it with exitwise.policies.policy_from_dict" if isinstance(policy, dict)
                   else ""))
        return run_early_exit(
            self, policy, labels=labels, profile=profile, count_flops=count_flops, **inputs
        )

    def full_depth(self, **inputs: Any) -> torch.Tensor:
        """The plain model: the backbone's own forward + the final head, (B, C) raw logits;
        in eval mode, as early exit runs (a model in train mode is switched for the call)."""
        with for_inference(self):
            return self._full_depth(**inputs)

    @torch.inference_mode()
    def _full_depth(self, **inputs: Any) -> torch.Tensor:
        inputs.pop("labels", None)
        if uses_previous_logits(self.heads[-1]) or uses_past_states(self.heads[-1]):
            # A cascade (past-future) final head needs every earlier exit's logits (states):
            # no plainer model exists.
            return self.forward(**inputs).logits[-1]
        hidden, mask = reference_output(self.backbone, **inputs)
        return self.heads[-1](hidden, mask)

    # -- calibration results ----------------------------------------------------------------
    def calibrated_policy(self, name: str | None = None) -> ExitPolicy:
        """The policy calibration stored (``name`` or the default one)."""
        policies = self.calibration.get("policies", {})
        hint = (f" (to run the {name!r} rule with a threshold of your own, pass a policy "
                f"object: ew.get_policy({name!r}, ...))" if name else "")
        if not policies:
            raise InputError("this model has no calibrated policy; run calibration first" + hint)
        key = name or self.calibration.get("default") or next(iter(policies))
        if key not in policies:
            raise InputError(
                f"no calibrated policy {key!r}; have: {', '.join(policies)}" + hint)
        searched = policies[key].get("temperatures")  # absent in folders saved before
        now = self.temperature_list()
        if searched is not None and not same_temperatures(searched, now,
                                                          self.temperatures.dtype):
            raise InputError(
                f"{key!r} was calibrated with temperatures {searched}, but the model now has "
                f"{now}: its thresholds (and certificate) do not hold under these; calibrate "
                "it again")
        return policy_from_dict(policies[key]["policy"])

    # -- persistence (exitwise.model_io) ------------------------------------------------------
    def save_pretrained(self, save_dir: str | Path, save_backbone: bool | None = None) -> Path:
        """Write exit_config.json + exit_heads.safetensors (+ the backbone if tuned).

        save_backbone: None (default) = only when a recipe tuned it. A frozen backbone that no
        name or path can bring back (an ``nn.Sequential``, a timm/torchvision model, a model
        built in memory) must then be passed to :meth:`from_pretrained`, or saved with
        ``save_backbone=True``.
        """
        return save_model(self, save_dir, save_backbone)

    def save_calibration(self, save_dir: str | Path) -> Path:
        """Rewrite what calibration changes in a saved model folder, the heads file (the
        temperatures live there) and exit_config.json, each under a temporary name and then
        renamed; the saved backbone is left as it is (rewriting it in place could tear it)."""
        return save_calibration(self, save_dir)

    @classmethod
    def from_pretrained(
        cls,
        load_dir: str | Path,
        backbone: nn.Module | Backbone | None = None,
        **backbone_kwargs: Any,
    ) -> "MultiExitModel":
        """Load exit heads (and the backbone: the saved copy, the one given, or the original
        name/hub id recorded at save time). Fails clearly if the shapes do not fit; warns
        when the backbone's weights are not the ones the heads were saved with."""
        return load_model(cls, load_dir, backbone, **backbone_kwargs)


def _keep_own_classifier(backbone: Backbone, config: ExitConfig, depths: list[int]
                         ) -> ExitConfig:
    """``config`` with the final exit set to the backbone's own classifier (head ``native``)
    when the model has one and the user named no final head (as ``final_head`` or as an
    entry of a per-exit ``head`` that covers the final exit) and asked for no other number of
    classes. Its number of outputs and class names fill ``num_labels`` / ``label_names`` when
    they are not given, also when the user's own final head replaces it (the task stays the
    network's)."""
    own = backbone.own_classifier()
    if own is None or config.head_name == "lm":
        return config
    changes: dict[str, Any] = {}
    if config.num_labels is None:  # the task is the own classifier's, whichever final head
        changes["num_labels"] = own.num_labels
        if config.label_names is None and own.label_names:
            changes["label_names"] = list(own.label_names)
    elif config.num_labels != own.num_labels:
        return config  # another number of classes: a new classifier (a fresh final head)
    head = config.head
    chosen = config.final_head is not None or (
        isinstance(head, list) and len(head) == len(depths)) or (
        isinstance(head, dict) and depths[-1] in head)
    if not chosen:  # else the user chose the final exit's head
        given, named = config.label_names, own.label_names
        if given is not None and named and list(given) != list(named):
            # the classifier's row i is its class i: other names (or the same in another
            # order) would silently name its outputs wrong
            how = ("in another order" if sorted(given) == sorted(named)
                   else "which are not its classes")
            raise ConfigError(
                f"the model's own classifier (kept as the final exit) has the classes "
                f"{list(named)} by id; label_names {list(given)} names them {how}. Give "
                "label_names in its order (and map your labels to its ids), leave them out, "
                "or pass final_head='linear' for a fresh final head")
        changes.update(final_head="native", final_head_kwargs={})
    return replace(config, **changes) if changes else config


def attach_exits(backbone: nn.Module | Backbone, config: ExitConfig | None = None, **kwargs: Any) -> MultiExitModel:
    """Wrap ``backbone`` (an HF encoder, an nn.Sequential or a Backbone) with exit heads.

    ``attach_exits(model, ExitConfig(layers="all", head="pooler", num_labels=2))`` or the same
    options as keywords.
    """
    if config is None:
        config = ExitConfig(**kwargs)
    elif kwargs:
        raise InputError("give either an ExitConfig or keyword options, not both")
    model = MultiExitModel(wrap_backbone(backbone), config)
    # Fresh heads follow the backbone's mode: an HF model from from_pretrained is in eval mode,
    # and early exit on it must not run the heads' dropout. Training recipes call .train().
    # Only the new modules are set: a part of the user's model kept in the other mode (a
    # frozen BatchNorm in eval mode) stays as it was.
    mode = bool(getattr(backbone, "training", True))
    users = {id(m) for m in backbone.modules()} if isinstance(backbone, nn.Module) else set()
    for m in model.modules():
        if id(m) not in users:
            m.training = mode
    return model


__all__ = ["MultiExitModel", "attach_exits", "ExitHead", "get_policy", "BACKBONE_DIR",
           "BACKBONE_WEIGHTS", "CONFIG_NAME", "FORMAT_VERSION", "HEADS_NAME"]
