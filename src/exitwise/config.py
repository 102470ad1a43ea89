"""ExitConfig: where the exits go and what they look like."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .backbones.placement import layers_at_flops_fractions, parse_flops_spec
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
    head: registered head name for the exits (see ``exitwise.heads.HEADS``), or one per exit:
        a list (one name per exit, shallowest first; the final exit may be left out when
        ``final_head`` is given) or a mapping depth -> name covering every exit (LGViT's
        heterogeneous exits: local-perception heads shallow, global-aggregation heads deep).
    final_head: head for the final exit; defaults to the final exit's entry of ``head``.
    num_labels: number of classes; 1 = a regression target (as Hugging Face's ``num_labels``).
        A model with its own task classifier keeps it as the final exit (head ``native``)
        unless ``final_head`` is given or ``num_labels`` differs from the classifier's (then
        the final exit is a fresh head). None (the default): the own classifier's; the
        vocabulary size for ``lm`` exits on a decoder LM; the number of ``label_names``; else 2.
    label_names: class names by id (Hugging Face's ``id2label``), saved with the model and used
        when printing and when reading string labels of new data.
    head_kwargs: extra options passed to every head (``hidden_features``, ``init_from_pooler``),
        or per exit: a list of option dicts, or a mapping depth -> option dict (a dict whose
        keys are all depths and whose values are all dicts is read as such a mapping).
    final_head_kwargs: options for the final head instead of ``head_kwargs`` (e.g. ``{}`` to
        keep an LM's final exit its own readout while earlier ``lm`` exits get adapters).
    dropout: dropout inside the heads.
    """

    layers: Any = "all"
    head: Any = "pooler"
    num_labels: int | None = None
    final_head: str | None = None
    head_kwargs: Any = field(default_factory=dict)
    final_head_kwargs: dict[str, Any] | None = None
    dropout: float = 0.1
    label_names: list[str] | None = None

    def __post_init__(self) -> None:
        if self.num_labels is not None and (
            not isinstance(self.num_labels, int) or isinstance(self.num_labels, bool)
            or self.num_labels < 1
        ):
            raise ConfigError(f"num_labels must be a positive int, got {self.num_labels!r}")
        if isinstance(self.layers, tuple):
            self.layers = list(self.layers)
        if self.label_names is not None:
            self.label_names = [str(n) for n in self.label_names]
            if len(set(self.label_names)) != len(self.label_names) or not self.label_names:
                raise ConfigError(f"label_names must be distinct names; got {self.label_names}")
            if self.num_labels is None:
                self.num_labels = len(self.label_names)
            elif self.num_labels != len(self.label_names):
                raise ConfigError(
                    f"{len(self.label_names)} label_names for num_labels={self.num_labels}"
                )
        if isinstance(self.head, tuple):
            self.head = list(self.head)
        names = self.head.values() if isinstance(self.head, dict) else (
            self.head if isinstance(self.head, list) else [self.head])
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ConfigError(
                f"head must be a head name, a list of names or a mapping depth -> name; got "
                f"{self.head!r}"
            )
        if isinstance(self.head, dict):  # JSON stores depths as strings
            self.head = {_depth_key(k, "head"): v for k, v in self.head.items()}
        if _is_per_depth(self.head_kwargs):
            self.head_kwargs = {
                _depth_key(k, "head_kwargs"): dict(v) for k, v in self.head_kwargs.items()
            }
        elif isinstance(self.head_kwargs, (list, tuple)):
            if not all(isinstance(v, dict) for v in self.head_kwargs):
                raise ConfigError("head_kwargs as a list must hold one option dict per exit")
            self.head_kwargs = [dict(v) for v in self.head_kwargs]
        elif not isinstance(self.head_kwargs, dict):
            raise ConfigError(f"head_kwargs must be a dict (or per exit); got {self.head_kwargs!r}")

    @property
    def head_name(self) -> str:
        """The head of the shallowest exit (the name when ``head`` is one name)."""
        if isinstance(self.head, str):
            return self.head
        return self.head[0] if isinstance(self.head, list) else self.head[min(self.head)]

    def check_depths(self, depths: list[int]) -> None:
        """Per-depth ``head`` / ``head_kwargs`` entries must name exits: an entry for a depth
        without one (a typo, or exits placed elsewhere) would be dropped silently. A
        ``head_kwargs`` list one short leaves the final exit to ``final_head`` options."""
        for name, value in (("head", self.head), ("head_kwargs", self.head_kwargs)):
            per_depth = isinstance(value, dict) and (name == "head" or _is_per_depth(value))
            extra = sorted(set(value) - set(depths)) if per_depth else []
            if extra:
                raise ConfigError(f"{name} has entries for depths {extra}, which carry no exit; "
                                  f"the exits are at {depths}")
        kw = self.head_kwargs
        if (isinstance(kw, list) and len(kw) == len(depths) - 1 and self.final_head is None
                and self.final_head_kwargs is None):
            raise ConfigError(
                f"head_kwargs lists {len(kw)} option dicts for {len(depths)} exits: give one "
                "per exit (or one per exit but the final one, with final_head or "
                "final_head_kwargs)")

    def head_for(self, k: int, depths: list[int]) -> tuple[str, dict[str, Any]]:
        """(head name, head options) of exit ``k`` among the exits at ``depths`` (the last is
        the final exit)."""
        final = k == len(depths) - 1
        depth = depths[k]
        if final and self.final_head:
            name = self.final_head
        elif isinstance(self.head, str):
            name = self.head
        elif isinstance(self.head, list):
            if len(self.head) not in (len(depths), len(depths) - 1) or (
                len(self.head) == len(depths) - 1 and not self.final_head
            ):
                raise ConfigError(
                    f"head lists {len(self.head)} names for {len(depths)} exits at depths "
                    f"{depths}: give one per exit (or one per exit but the final one, with "
                    "final_head)"
                )
            name = self.head[k]
        else:
            if depth not in self.head:
                raise ConfigError(
                    f"head has no entry for the exit at depth {depth}; the exits are at "
                    f"{depths} and head maps {sorted(self.head)}"
                )
            name = self.head[depth]
        if final and self.final_head_kwargs is not None:
            return name, dict(self.final_head_kwargs)
        kw = self.head_kwargs
        if isinstance(kw, list):
            if len(kw) not in (len(depths), len(depths) - 1):
                raise ConfigError(
                    f"head_kwargs lists {len(kw)} option dicts for {len(depths)} exits"
                )
            return name, dict(kw[k]) if k < len(kw) else {}
        if _is_per_depth(kw):
            return name, dict(kw.get(depth, {}))
        return name, dict(kw)

    def resolve_layers(self, num_layers: int, backbone: Any = None) -> list[int]:
        """Depths (1..num_layers, sorted, unique) that carry an exit; the last is num_layers.

        backbone: the adapter, needed only by ``"flops:..."`` specs.
        """
        spec = self.layers
        if isinstance(spec, str) and spec.startswith("flops:"):
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


def _is_per_depth(value: Any) -> bool:
    """A head_kwargs mapping depth -> options (keys all depths, values all dicts)."""
    return (
        isinstance(value, dict) and bool(value)
        and all(isinstance(v, dict) for v in value.values())
        and all((isinstance(k, int) and not isinstance(k, bool)) or (
            isinstance(k, str) and k.isdigit()) for k in value)
    )


def _depth_key(key: Any, what: str) -> int:
    try:
        depth = int(key)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} keys must be exit depths (ints); got {key!r}") from None
    if depth < 1:
        raise ConfigError(f"{what} keys must be depths >= 1; got {key!r}")
    return depth
