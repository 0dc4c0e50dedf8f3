"""Choosing a compressor by a small spec: a name and its settings, as a string plus
keywords or as a dict (the form a job spec or a plan carries)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping

from compressors.compressor import Compressor
from compressors.quantizers import Fp16Quantizer, Int8Quantizer, NoCompression
from compressors.sparsifiers import RandomK, SampledTopK, TopK

COMPRESSORS: dict[str, type[Compressor]] = {
    c.name: c for c in (NoCompression, Fp16Quantizer, Int8Quantizer, TopK, SampledTopK, RandomK)
}


def build_compressor(spec: str | Mapping[str, object] = "none", /, **options: object) -> Compressor:
    """The compressor a spec names, e.g. `build_compressor("topk", ratio=0.01, values="fp16")`.

    A dict spec is `{"name": "topk", "ratio": 0.01, ...}` or the job spec's shorthand
    `{"topk": 0.01}`; keywords override its fields. Unknown names, unknown or missing
    settings and out-of-range values raise ValueError naming the field.
    """
    name, settings = _name_and_settings(spec)
    settings.update(options)
    if not isinstance(name, str) or name not in COMPRESSORS:
        raise ValueError(f"name: unknown compressor {name!r} (known: {', '.join(COMPRESSORS)})")
    cls = COMPRESSORS[name]
    params = {
        p.name: p
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.name != "self" and p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    for field in settings:
        if field not in params:
            known = ", ".join(params) or "none"
            raise ValueError(f"{field}: not a setting of compressor {name!r} (settings: {known})")
    for field, p in params.items():
        if p.default is inspect.Parameter.empty and field not in settings:
            raise ValueError(f"{field}: compressor {name!r} needs this setting")
    return cls(**settings)


def _name_and_settings(spec: object) -> tuple[object, dict[str, object]]:
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, Mapping):
        if "name" in spec:
            settings = {str(k): v for k, v in spec.items()}
            return settings.pop("name"), settings
        if len(spec) == 1:
            ((name, ratio),) = spec.items()
            return name, {"ratio": ratio}
        raise ValueError(f"name: a compressor spec needs a 'name' field, got {dict(spec)!r}")
    raise ValueError(f"name: a compressor spec is a name or a dict, not {type(spec).__name__}")
