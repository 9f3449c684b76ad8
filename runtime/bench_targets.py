"""effllm-bench's plan: which (backend, exported variant) pairs a MODEL argument offers, and the settings
every measurement shares. Nothing is measured here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from effllm.common.errors import EffllmError

from .generate import check_files
from .model_files import BACKENDS, FORMAT_OF_BACKEND, find_model_files, model_bytes

BENCH_BACKENDS = tuple(b for b in BACKENDS if b != "executorch-runner")
DEFAULT_PROMPT_LENGTHS = (128, 512)
DEFAULT_NEW_TOKENS = 128
WORKER_TIMEOUT_S = 3600


@dataclass
class BenchSettings:
    threads: int | None = None
    prompt_lengths: tuple[int, ...] = DEFAULT_PROMPT_LENGTHS
    new_tokens: int = DEFAULT_NEW_TOKENS
    warmup: int = 1
    repeats: int = 3
    seed: int = 0
    timeout_s: float = WORKER_TIMEOUT_S


@dataclass
class Target:
    backend: str
    variant: str
    quantization: str
    path: str  # what load_backend takes
    file_bytes: int
    model: str = ""  # a label for the model (several models in one report)
    export_dir: str | None = None  # where verify.json may be


def quantization_of(variant: str) -> str:
    """The quantization a variant's name says; "fp32" marks a format's unquantized variant, the baseline that
    bench_report compares quantized rows with (for gguf/ that is f16 weights unless exported --gguf-dtype f32)."""
    return variant.split("-", 1)[1] if "-" in variant else "fp32"


def file_quantization(path: Path) -> str:
    """A GGUF's weight type as its header names it (general.file_type: "q4_1", "f16", ...); "fp32" for other files."""
    if path.suffix != ".gguf":
        return "fp32"
    import gguf

    field = gguf.GGUFReader(str(path)).fields.get("general.file_type")
    if field is None:
        return "unknown"
    name = gguf.LlamaFileType(int(field.contents())).name  # MOSTLY_Q4_1, ALL_F32
    return name.split("_", 1)[1].lower()


def plan_targets(
    model: str | Path, backends: list[str] | None = None, variants: list[str] | None = None, label: str = ""
) -> list[Target]:
    """Every (backend, variant) pair MODEL offers, filtered by ``backends`` / ``variants``."""
    model = Path(model)
    files = find_model_files(model)
    backends = list(backends or BENCH_BACKENDS)
    unknown = [b for b in backends if b not in BENCH_BACKENDS]
    if unknown:
        raise EffllmError(f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(BENCH_BACKENDS)}")
    available = set(files.variants) | ({"model"} if files.hf else set())
    if variants:
        missing = [v for v in variants if v not in available]
        if missing:
            raise EffllmError(f"no variant {', '.join(missing)} in {model}; found: {', '.join(sorted(available))}")
    export_dir = None
    dirs = [location for _, location in files.variants.values() if location.is_dir()]
    if dirs:  # (a model file's own directory is no export: no verify.json to look for)
        export_dir = str(dirs[0].parent)
    targets = []
    for backend in backends:
        fmt = FORMAT_OF_BACKEND[backend]
        if fmt == "hf":
            if files.hf is not None and (not variants or "model" in variants):
                path = files.hf
                targets.append(
                    Target(backend, "model", "fp32", str(path), model_bytes(path), label, export_dir)
                )
            continue
        for name, (vfmt, location) in files.variants.items():
            if vfmt != fmt or (variants and name not in variants):
                continue
            if location.is_file():  # a model file not named as effllm-export names it
                path, quantization = location, file_quantization(location)
            else:
                path, quantization = (location / "model.pte" if fmt == "pte" else location), quantization_of(name)
            size = model_bytes(path if fmt == "pte" else location)
            targets.append(Target(backend, name, quantization, str(path), size, label, export_dir))
    for target in targets:  # a bad file is bad input: refused here, before any report is written
        check_files(target.backend, target.path)
    if not targets:
        raise EffllmError(
            f"nothing to benchmark in {model} for backends {', '.join(backends)}"
            + (f" and variants {', '.join(variants)}" if variants else "")
            + f" (found: {', '.join(sorted(available)) or 'nothing'})"
        )
    return targets


def android_variants(model: Path, variants: list[str] | None) -> list[tuple[str, Path]]:
    files = find_model_files(model)
    found = [(name, vdir) for name, (fmt, vdir) in files.variants.items() if fmt == "pte"]
    if variants:
        found = [(n, p) for n, p in found if n in variants]
    return found
