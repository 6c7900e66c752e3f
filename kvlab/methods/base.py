"""Method base class, registry and the method-spec parser (``kivi-2:group_size=32,sinks=4``)."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, ClassVar

REGISTRY: dict[str, type["Method"]] = {}
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {}


class Method:
    """A KV-cache compression method: a frozen dataclass of parameters that builds cache layers.

    Subclasses are dataclasses; their fields are the user-settable parameters, validated in
    ``validate``. ``make_layer`` returns the transformers cache layer for one attention layer.
    """

    name: ClassVar[str]
    preset_name: str = ""

    def validate(self) -> None:
        """Raise ValueError on an invalid parameter combination."""

    def make_layer(self, layer_idx: int, head_dim: int):  # -> CacheLayerMixin
        raise NotImplementedError

    def check_head_dim(self, head_dim: int) -> None:
        """Raise ValueError if this configuration cannot store heads of ``head_dim`` channels."""

    def bits_per_value(self, head_dim: int) -> float:
        """Storage bits per cached value of the compressed part (codes + scales + indices)."""
        return 16.0

    def full_precision_tokens(self, length: int) -> int:
        """Tokens held in 16-bit precision (sinks, residual window) in steady state at ``length``."""
        return length

    def all_in_bits(self, length: int, head_dim: int) -> float:
        """Bits per value of the whole cache at ``length`` tokens (16-bit sinks and residual included)."""
        fp = min(length, self.full_precision_tokens(length))
        return (16 * fp + self.bits_per_value(head_dim) * (length - fp)) / length

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @property
    def label(self) -> str:
        """The preset name with the parameters that differ from that preset, e.g. ``kivi-2:group_size=32``."""
        base = self.preset_name or self.name
        preset_params = PRESETS.get(base, (self.name, {}))[1]
        default = type(self)(**preset_params)
        changed = {k: v for k, v in self.params().items() if getattr(default, k) != v}
        return base + (":" + ",".join(f"{k}={v}" for k, v in changed.items()) if changed else "")


def register(name: str, presets: dict[str, dict[str, Any]] | None = None):
    """Class decorator: register a method under ``name`` and optional named presets."""

    def wrap(cls: type[Method]) -> type[Method]:
        cls.name = name
        REGISTRY[name] = cls
        PRESETS[name] = (name, {})
        for preset, params in (presets or {}).items():
            PRESETS[preset] = (name, params)
        return cls

    return wrap


def _convert(raw: str, typ: Any, key: str, method: str) -> Any:
    typ = typing.get_args(typ)[0] if typing.get_origin(typ) is typing.Union else typ
    try:
        if typ is bool:
            if raw.lower() in ("1", "true", "yes"):
                return True
            if raw.lower() in ("0", "false", "no"):
                return False
            raise ValueError
        if typ is str:
            return raw
        return typ(raw)
    except ValueError:
        tname = getattr(typ, "__name__", str(typ))
        raise ValueError(f"{method}: parameter {key}={raw!r} is not a valid {tname}") from None


def build_method(name: str, **overrides: Any) -> Method:
    """Instantiate a registered method or preset with parameter overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(sorted(PRESETS))}")
    base, preset_params = PRESETS[name]
    cls = REGISTRY[base]
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"{name}: unknown parameter(s) {unknown}; valid parameters: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    params = dict(preset_params)
    for key, value in overrides.items():
        params[key] = _convert(value, hints[key], key, name) if isinstance(value, str) else value
    method = cls(**params)
    object.__setattr__(method, "preset_name", name)
    method.validate()
    return method


def parse_method(spec: str) -> Method:
    """Parse ``name[:key=value,key=value]`` into a validated Method.

    ``a+b`` composes an eviction method ``a`` with a quantization method ``b`` (``h2o+kitty-pro``).
    """
    spec = spec.strip()
    if "+" in spec:
        from kvlab.eviction_quant import Composed

        parts = spec.split("+")
        if len(parts) != 2:
            raise ValueError(f"method spec {spec!r}: compose exactly two methods, eviction+quantization")
        method = Composed(parse_method(parts[0]), parse_method(parts[1]))
        method.validate()
        return method
    name, _, args = spec.partition(":")
    overrides: dict[str, str] = {}
    for item in filter(None, (a.strip() for a in args.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise ValueError(f"bad parameter {item!r} in method spec {spec!r}; expected key=value")
        if key.strip() in overrides:
            raise ValueError(f"parameter {key.strip()!r} given twice in method spec {spec!r}")
        overrides[key.strip()] = value.strip()
    return build_method(name.strip(), **overrides)
