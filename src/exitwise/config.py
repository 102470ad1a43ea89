"""ExitConfig: where the exits go and what they look like."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import ConfigError


@dataclass
class ExitConfig:
    """Exit placement and head settings.

    layers: where exits sit, as depths counted from 1 (an exit at depth d reads the output of
        the d-th block). ``"all"`` = after every block; an int k or ``"every:k"`` = after every
        k-th block; a list of depths; ``"flops:0.15,0.3,..."`` = after the blocks where the
        cumulative FLOPs first reach those fractions of the network's (SDN's placement; needs
        the backbone, see :func:`exitwise.backbones.placement.layers_at_flops_fractions`).
        The final block always carries an exit (the final classifier), added if missing.
    head: registered head name for the exits (see ``exitwise.heads.HEADS``).
    final_head: head for the final exit; defaults to ``head``.
    num_labels: number of classes; None (the default) = the vocabulary size for ``lm`` exits
        on a decoder LM, else 2.
    head_kwargs: extra options passed to every head (``hidden_features``, ``init_from_pooler``).
    final_head_kwargs: options for the final head instead of ``head_kwargs`` (e.g. ``{}`` to
        keep an LM's final exit its own readout while earlier ``lm`` exits get adapters).
    dropout: dropout inside the heads.
    """

    layers: Any = "all"
    head: str = "pooler"
    num_labels: int | None = None
    final_head: str | None = None
    head_kwargs: dict[str, Any] = field(default_factory=dict)
    final_head_kwargs: dict[str, Any] | None = None
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.num_labels is not None and (
            not isinstance(self.num_labels, int) or self.num_labels < 1
        ):
            raise ConfigError(f"num_labels must be a positive int, got {self.num_labels!r}")
        if isinstance(self.layers, tuple):
            self.layers = list(self.layers)

    def resolve_layers(self, num_layers: int, backbone: Any = None) -> list[int]:
        """Depths (1..num_layers, sorted, unique) that carry an exit; the last is num_layers.

        backbone: the adapter, needed only by ``"flops:..."`` specs.
        """
        spec = self.layers
        if isinstance(spec, str) and spec.startswith("flops:"):
            from .backbones.placement import layers_at_flops_fractions, parse_flops_spec

            fractions = parse_flops_spec(spec)
            if backbone is None:
                raise ConfigError(f"layers={spec!r} needs the backbone to measure FLOPs")
            spec = layers_at_flops_fractions(backbone, fractions)
        if isinstance(spec, str) and spec.startswith("every:"):
            try:
                spec = int(spec.split(":", 1)[1])
            except ValueError:
                raise ConfigError(f"bad layers spec {self.layers!r}; use 'every:K'") from None
        if spec == "all":
            depths = list(range(1, num_layers + 1))
        elif isinstance(spec, int) and not isinstance(spec, bool):
            if spec < 1:
                raise ConfigError(f"every-k exit spacing must be >= 1, got {spec}")
            depths = list(range(spec, num_layers + 1, spec))
        elif isinstance(spec, list) and all(isinstance(d, int) for d in spec):
            bad = [d for d in spec if not 1 <= d <= num_layers]
            if bad:
                raise ConfigError(
                    f"exit layers {bad} are out of range: this backbone has {num_layers} "
                    f"layers, so exits go at depths 1..{num_layers}"
                )
            depths = sorted(set(spec))
        else:
            raise ConfigError(
                f"layers must be 'all', an int k, 'every:k', 'flops:f1,f2,...' or a list of "
                f"depths; got {spec!r}"
            )
        if not depths or depths[-1] != num_layers:
            depths.append(num_layers)
        return depths

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ExitConfig":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)
