"""Named attack variants of a benchmark: one method with settings of its own, side by side with the others.

An entry of a benchmark's `attacks:` list is a method's name (the variant of that name, with the benchmark's
`attack:` settings) or a mapping naming a variant:

```yaml
attacks:
  - lora
  - {name: lora-strong, method: lora, lr_scale: 3, steps_scale: 2}
  - {name: lora-fresh, method: lora, prompt: fresh-token}
```

`lr_scale` and `steps_scale` multiply the learning rate and the step budget the run would have without them: the
benchmark's `attack:` value if it sets one, else the method's default for the model (`Attack.settings`). Any other
key is an `AttackConfig` field that this variant sets over the benchmark's `attack:` settings (not `seed`: the
benchmark's seeds run every variant). Each variant writes its runs to `attacks/<model>/<name>/`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mima.attacks.config import AttackConfig
from mima.errors import ConfigError

_OWN_KEYS = ("name", "method", "lr_scale", "steps_scale")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class AttackVariant:
    """One attack of a benchmark: its folder name, its method, scales of the learning rate and steps, and the
    `AttackConfig` fields it sets."""

    name: str
    method: str
    lr_scale: float = 1.0
    steps_scale: float = 1.0
    overrides: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, entry: Any) -> AttackVariant:
        """A variant from an `attacks:` entry: a method's name or a mapping (`ConfigError` on a bad one)."""
        if isinstance(entry, str):
            return cls(_checked_name(entry), entry)
        if not isinstance(entry, Mapping):
            raise ConfigError(f"an attack entry must be a method's name or a mapping with a name, got {entry!r}")
        name = _checked_name(entry.get("name"))
        if not isinstance(entry.get("method"), str):
            raise ConfigError(f"attack variant '{name}' needs a method, e.g. method: lora")
        overrides = {k: v for k, v in entry.items() if k not in _OWN_KEYS}
        if "seed" in overrides:
            raise ConfigError(f"attack variant '{name}' sets a seed; the benchmark's seeds run every variant")
        try:
            AttackConfig.from_dict(overrides)
        except ConfigError as e:
            raise ConfigError(f"attack variant '{name}': {e}") from None
        scales = [_checked_scale(name, key, entry.get(key, 1.0)) for key in ("lr_scale", "steps_scale")]
        return cls(name, entry["method"], *scales, overrides)

    def config(self, shared: Mapping[str, Any], seed: int, *, toy: bool) -> AttackConfig:
        """The settings of this variant's run with `seed`, over the benchmark's `shared` ones; the scales apply to
        the method's defaults for a model of the toy world (`toy`) or a real one."""
        config = AttackConfig.from_dict({**shared, **self.overrides, "method": self.method, "seed": seed})
        if self.lr_scale == 1 and self.steps_scale == 1:
            return config
        from mima.attacks import attacks

        resolved = attacks.get(self.method).settings(config, toy=toy)
        return config.with_overrides(lr=resolved.lr * self.lr_scale,
                                     steps=max(1, round(resolved.steps * self.steps_scale)))

    def rewrites_prompts(self, shared: Mapping[str, Any]) -> bool:
        """Whether this variant's runs change the concept's prompts (their step 0 is not the model's own drawing)."""
        from mima.attacks import attacks

        prompt = self.overrides.get("prompt", shared.get("prompt"))
        return attacks.get(self.method).rewrites_prompts(prompt)


def parse_variants(entries: tuple[Any, ...]) -> tuple[AttackVariant, ...]:
    """Every variant of an `attacks:` list, names unique (`ConfigError` otherwise)."""
    variants = tuple(AttackVariant.parse(entry) for entry in entries)
    names = [v.name for v in variants]
    if duplicates := sorted({n for n in names if names.count(n) > 1}):
        raise ConfigError(f"attack name(s) {duplicates} given twice; give each variant its own name")
    return variants


def _checked_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"an attack variant needs a name of letters, digits, '.', '_' and '-', got {name!r}")
    return name


def _checked_scale(name: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"attack variant '{name}': {key} must be a positive number, got {value!r}")
    return float(value)
