"""The match profile (DESIGN.md section 3): how metadata compares, k, mode and partition.

Checked twice: its shape when loaded (`load`), and against a group's data before any work
(`mtool.match.engine.check_profile_fits`), so an unknown key or a numeric key that does not
parse is refused with the key named, exit 78 / 65.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from mtool.errors import ConfigError

KEY_TYPES = ("categorical", "numeric", "multi")
MODES = ("auto", "symmetric", "bipartite")
DEFAULT_K = 20


@dataclass(frozen=True)
class KeySpec:
    name: str
    type: str
    weight: float = 1.0
    required: bool = False
    scale: float | None = None  # numeric
    separator: str = ","  # multi


@dataclass(frozen=True)
class Partition:
    key: str
    left: str
    right: str


@dataclass(frozen=True)
class MatchProfile:
    k: int = DEFAULT_K
    mode: str = "auto"
    keys: tuple = ()
    partition: Partition | None = None
    embedding_weight: float | None = None
    source: str = "<default>"

    @property
    def bipartite(self) -> bool:
        return self.mode == "bipartite" or (self.mode == "auto" and self.partition is not None)

    def with_overrides(self, k: int | None = None, mode: str | None = None) -> "MatchProfile":
        from dataclasses import replace

        out = replace(self, k=k or self.k, mode=mode or self.mode)
        if out.mode == "bipartite" and out.partition is None:
            raise ConfigError(f"{self.source}: mode bipartite needs a partition", hint="add partition: {key, left, right}")
        return out


def _bad(where: str, message: str) -> ConfigError:
    return ConfigError(f"profile {where}: {message}", hint="see the profile format in the README")


def parse(data: dict, source: str = "<profile>") -> MatchProfile:
    if not isinstance(data, dict):
        raise _bad(source, "must be a mapping")
    unknown = set(data) - {"k", "mode", "keys", "partition", "embedding"}
    if unknown:
        raise _bad(source, f"unknown field(s) {', '.join(sorted(unknown))}")
    k = data.get("k", DEFAULT_K)
    if not isinstance(k, int) or k < 1:
        raise _bad(source, f"k must be a positive integer, not {k!r}")
    mode = data.get("mode", "auto")
    if mode not in MODES:
        raise _bad(source, f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    keys = []
    for name, spec in (data.get("keys") or {}).items():
        if not isinstance(spec, dict) or spec.get("type") not in KEY_TYPES:
            raise _bad(source, f"key {name!r} needs type: one of {', '.join(KEY_TYPES)}")
        weight = spec.get("weight", 1.0)
        if not isinstance(weight, (int, float)) or weight <= 0:
            raise _bad(source, f"key {name!r}: weight must be a positive number")
        scale = spec.get("scale")
        if spec["type"] == "numeric" and (not isinstance(scale, (int, float)) or scale <= 0):
            raise _bad(source, f"key {name!r}: a numeric key needs a positive scale")
        keys.append(KeySpec(name, spec["type"], float(weight), bool(spec.get("required", False)),
                            float(scale) if scale else None, str(spec.get("separator", ","))))
    partition = None
    if data.get("partition") is not None:
        p = data["partition"]
        if not isinstance(p, dict) or not all(p.get(x) is not None for x in ("key", "left", "right")):
            raise _bad(source, "partition needs key, left and right")
        partition = Partition(str(p["key"]), str(p["left"]), str(p["right"]))
    embedding_weight = None
    if data.get("embedding") is not None:
        w = (data["embedding"] or {}).get("weight", 1.0)
        if not isinstance(w, (int, float)) or w <= 0:
            raise _bad(source, "embedding weight must be a positive number")
        embedding_weight = float(w)
    if not keys and embedding_weight is None:
        raise _bad(source, "names no key and no embedding: nothing to compare")
    if mode == "bipartite" and partition is None:
        raise _bad(source, "mode bipartite needs a partition")
    return MatchProfile(k, mode, tuple(keys), partition, embedding_weight, source)


def load(path: str | None) -> MatchProfile:
    """A profile file (YAML or JSON); None: compare by embedding only."""
    if path is None:
        return MatchProfile(embedding_weight=1.0, source="<default: embedding only>")
    import yaml

    try:
        with open(path) as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError(f"profile {path}: {exc.strerror}") from None
    try:
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"profile {path} is not valid YAML/JSON: {exc}") from None
    return parse(data, path)
