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
    target_recall: float | None = None  # --target-recall overrides; default calibrate.DEFAULT_TARGET
    missing: str = "skip"  # skip: a key either node lacks is left out of the formula; zero: it scores 0

    def describe(self) -> dict:
        """Everything that changes the result, in a stable form (the cycle fingerprint's part;
        `source`, the file's name, is not)."""
        from dataclasses import asdict

        return {"k": self.k, "bipartite": self.bipartite, "missing": self.missing, "keys": [asdict(k) for k in self.keys],
                "partition": None if self.partition is None else asdict(self.partition),
                "embedding_weight": self.embedding_weight}

    @property
    def bipartite(self) -> bool:
        return self.mode == "bipartite" or (self.mode == "auto" and self.partition is not None)

    def with_overrides(self, k: int | None = None, mode: str | None = None) -> "MatchProfile":
        from dataclasses import replace

        out = replace(self, k=self.k if k is None else check_k(k, "--k"), mode=mode or self.mode)
        if out.mode == "bipartite" and out.partition is None:
            raise ConfigError(f"{self.source}: mode bipartite needs a partition", hint="add partition: {key, left, right}")
        return out


MAX_K = 1000  # matches kept per node at most: 1,000 x 1M nodes is already 10^9 edges per group
FIELDS = ("k", "mode", "keys", "partition", "embedding", "target_recall", "missing")
MISSING = ("skip", "zero")
KEY_FIELDS = {"categorical": ("type", "weight", "required"),
              "numeric": ("type", "weight", "required", "scale"),
              "multi": ("type", "weight", "required", "separator")}
PARTITION_FIELDS = ("key", "left", "right")
EMBEDDING_FIELDS = ("weight",)


def _bad(where: str, message: str) -> ConfigError:
    return ConfigError(f"profile {where}: {message}", hint="see the profile format in the README")


def _check_fields(source: str, where: str, data: dict, known) -> None:
    """Refuse a field the format does not have, naming the nearest known one (a typo such as
    `wieght` must not be ignored: the weight would silently stay 1)."""
    import difflib

    for name in data:
        if name not in known:
            near = difflib.get_close_matches(str(name), known, n=1)
            raise _bad(source, f"{where}unknown field {name!r}" + (f" (did you mean {near[0]!r}?)" if near else "")
                       + f"; known: {', '.join(known)}")


def _number(source: str, what: str, value) -> float:
    """A finite, positive number: weights and scales (booleans, NaN and infinity refused)."""
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise _bad(source, f"{what} must be a finite positive number, not {value!r}")
    return float(value)


def _mapping(source: str, what: str, value) -> dict:
    if not isinstance(value, dict):
        raise _bad(source, f"{what} must be a mapping (name: value, ...), not {type(value).__name__} {value!r}")
    return value


def _scalar_text(source: str, what: str, value) -> str:
    """A partition value: a string, or a number written without quotes (metadata values are text)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or str(value) == "":
        raise _bad(source, f"{what} must be a non-empty string, not {value!r}")
    return str(value)


def check_k(k, what: str = "k") -> int:
    """k is an integer from 1 to MAX_K (True is not 1); a k above a group's size keeps every candidate."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise ConfigError(f"{what} must be an integer from 1 to {MAX_K}, not {k!r}")
    return k


def _key(source: str, name, spec) -> KeySpec:
    where = f"key {name!r}: "
    spec = _mapping(source, f"key {name!r}", spec)
    kind = spec.get("type")
    if kind not in KEY_TYPES:
        raise _bad(source, f"{where}type must be one of {', '.join(KEY_TYPES)}, not {kind!r}")
    _check_fields(source, where, spec, KEY_FIELDS[kind])
    weight = _number(source, f"{where}weight", spec.get("weight", 1.0))
    required = spec.get("required", False)
    if not isinstance(required, bool):
        raise _bad(source, f"{where}required must be true or false, not {required!r}")
    scale = None
    if kind == "numeric":
        if "scale" not in spec:
            raise _bad(source, f"{where}a numeric key needs a scale (the distance at which its score reaches 0)")
        scale = _number(source, f"{where}scale", spec["scale"])
    separator = spec.get("separator", ",")
    if not isinstance(separator, str) or separator == "":
        raise _bad(source, f"{where}separator must be a non-empty string, not {separator!r}")
    return KeySpec(str(name), kind, weight, required, scale, separator)


def parse(data: dict, source: str = "<profile>") -> MatchProfile:
    """A profile from its YAML/JSON data, every field checked (exit 78 naming the field)."""
    _mapping(source, "the profile", data)
    _check_fields(source, "", data, FIELDS)
    k = data.get("k", DEFAULT_K)
    try:
        check_k(k)
    except ConfigError as exc:
        raise _bad(source, exc.message) from None
    mode = data.get("mode", "auto")
    if mode not in MODES:
        raise _bad(source, f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    keys_data = data.get("keys")
    keys = tuple(_key(source, name, spec) for name, spec in
                 (_mapping(source, "keys", keys_data) if keys_data is not None else {}).items())
    partition = None
    if data.get("partition") is not None:
        p = _mapping(source, "partition", data["partition"])
        _check_fields(source, "partition: ", p, PARTITION_FIELDS)
        missing = [x for x in PARTITION_FIELDS if p.get(x) is None]
        if missing:
            raise _bad(source, f"partition needs key, left and right (missing: {', '.join(missing)})")
        partition = Partition(*(_scalar_text(source, f"partition {x}", p[x]) for x in PARTITION_FIELDS))
        if partition.left == partition.right:
            raise _bad(source, f"partition left and right must differ (both {partition.left!r}): a side cannot be "
                               "matched with itself")
    embedding_weight = None
    if data.get("embedding") is not None:
        e = _mapping(source, "embedding", data["embedding"])
        _check_fields(source, "embedding: ", e, EMBEDDING_FIELDS)
        embedding_weight = _number(source, "embedding weight", e.get("weight", 1.0))
    if not keys and embedding_weight is None:
        raise _bad(source, "names no key and no embedding: nothing to compare")
    if mode == "bipartite" and partition is None:
        raise _bad(source, "mode bipartite needs a partition")
    target = data.get("target_recall")
    if target is not None and (isinstance(target, bool) or not isinstance(target, (int, float))
                               or not 0 < target <= 1):
        raise _bad(source, f"target_recall must be a number above 0 and at most 1, not {target!r}")
    missing = data.get("missing", "skip")
    if missing not in MISSING:
        raise _bad(source, f"missing must be one of {', '.join(MISSING)}, not {missing!r}")
    return MatchProfile(k, mode, keys, partition, embedding_weight, source,
                        None if target is None else float(target), missing)

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
