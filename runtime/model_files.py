"""Where a model's files are: the torch model directory, the export variants, and which one a backend runs.

MODEL may be a model directory (effllm-train: config.json, model.safetensors, tokenizer.json), an
export directory (effllm-export: onnx/, onnx-int8/, onnx-int4/, executorch/, executorch-8da4w/, gguf/,
gguf-q8_0/, ...), one variant directory of it, a model file (.onnx, .pte or .gguf, any name: a GGUF that
effllm did not write, e.g. from ollama or the Hugging Face hub, runs with the tokenizer inside it), or a run
directory holding model/ and export/.
A model directory finds its export beside it (model -> export, as effllm-train and effllm-export lay
them out, or DIR -> DIR-export) and vice versa. Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .backend import GenerationError

BACKENDS = ("torch", "onnxruntime", "genai", "executorch", "executorch-runner", "llamacpp")
FORMAT_OF_BACKEND = {
    "torch": "hf",
    "onnxruntime": "onnx",
    "genai": "onnx",
    "executorch": "pte",
    "executorch-runner": "pte",
    "llamacpp": "gguf",
}
FP32_VARIANT = {"onnx": "onnx", "pte": "executorch", "gguf": "gguf"}
AUTO_ORDER = ("onnxruntime", "executorch", "llamacpp", "torch")  # what "auto" picks, first available
VARIANT_FILES = {"model.onnx": "onnx", "model.pte": "pte", "model.gguf": "gguf"}  # the file that marks each format
DEFAULT_EXPORT = Path("runs/quickstart/export")
DEFAULT_MODEL = Path("runs/quickstart/model")
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# Names that start a model's own bytes (tokenizer and config files excluded): an exported variant's file with
# its external data (model.onnx.data), or a model directory's weights, sharded ones (model-00001-of-...) included.
MODEL_BYTES_PREFIXES = (*VARIANT_FILES, "model.safetensors", "model-", "pytorch_model")


@dataclass
class Located:
    backend: str
    path: Path  # what load_backend takes: model dir (torch), variant dir (onnx, genai, llamacpp), model.pte (executorch),
    # or the model file itself when it is not named as effllm-export names it
    variant: str  # "model" for torch, else the export variant's directory name (a foreign file: its name)
    tokenizer: Path | None  # tokenizer.json; None: the tokenizer inside the model file (a foreign GGUF)


@dataclass
class ModelFiles:
    """Everything found from one MODEL argument: the torch model dir and the export variants."""

    hf: Path | None = None
    variants: dict[str, tuple[str, Path]] = field(default_factory=dict)  # name -> (format, variant dir or file)

    def formats(self) -> set[str]:
        found = {fmt for fmt, _ in self.variants.values()}
        return found | ({"hf"} if self.hf else set())


def is_model_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and any((path / w).is_file() for w in WEIGHT_FILES)


def variant_format(path: Path) -> str | None:
    return next((fmt for name, fmt in VARIANT_FILES.items() if (path / name).is_file()), None)


def model_bytes(path: Path) -> int:
    """Bytes of the model itself: model.onnx(+.data), model.pte, model.gguf, or the weight files of a model directory."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file() and p.name.startswith(MODEL_BYTES_PREFIXES))


def export_variants(export_dir: Path) -> dict[str, tuple[str, Path]]:
    out = {}
    if export_dir.is_dir():
        for sub in sorted(export_dir.iterdir()):
            fmt = variant_format(sub) if sub.is_dir() and not sub.name.startswith(".") else None
            if fmt:
                out[sub.name] = (fmt, sub)
    return out


def sibling_export(model_dir: Path) -> Path:
    resolved = model_dir.resolve()
    return resolved.parent / "export" if resolved.name == "model" else resolved.with_name(resolved.name + "-export")


def sibling_model(export_dir: Path) -> Path | None:
    resolved = export_dir.resolve()
    if resolved.name == "export":
        return resolved.parent / "model"
    if resolved.name.endswith("-export"):
        return resolved.with_name(resolved.name[: -len("-export")])
    return None


def find_model_files(model: Path) -> ModelFiles:
    """What MODEL holds, or GenerationError naming what was expected."""
    if not model.exists():
        raise GenerationError(
            f"{model} does not exist; give a model directory (effllm-train), an export directory "
            "(effllm-export), one of its variant directories, or a model file (model.onnx, model.pte, any .gguf)"
        )
    files = ModelFiles()
    if model.is_file():
        fmt = {Path(name).suffix: f for name, f in VARIANT_FILES.items()}.get(model.suffix)
        if fmt is None:
            raise GenerationError(f"{model} is not a .onnx, .pte or .gguf file; give a model or export directory")
        if model.name in VARIANT_FILES:  # effllm-export's file: its variant directory, as when that is given
            files.variants[model.parent.name] = (fmt, model.parent)
        else:  # any other name (SmolLM2-135M-Instruct.Q4_1.gguf): the file itself
            files.variants[model.name] = (fmt, model)
        return files
    fmt = variant_format(model)
    if fmt:
        files.variants[model.name] = (fmt, model)
        return files
    if is_model_dir(model):
        files.hf = model
        files.variants = export_variants(sibling_export(model))
        return files
    variants = export_variants(model)
    if variants:
        files.variants = variants
        hf = sibling_model(model)
        files.hf = hf if hf is not None and is_model_dir(hf) else None
        return files
    if (model / "export").is_dir() or is_model_dir(model / "model"):  # a run directory (effllm-train --out)
        files.variants = export_variants(model / "export")
        files.hf = model / "model" if is_model_dir(model / "model") else None
        if files.variants or files.hf:
            return files
    raise GenerationError(
        f"{model} holds no model: expected config.json + model.safetensors (a model directory), model.onnx, "
        "model.pte or model.gguf (an exported variant), or variant subdirectories such as onnx/ and gguf/ (effllm-export)"
    )


def locate(model: str | Path, backend: str = "auto", variant: str | None = None) -> Located:
    """Which files ``backend`` runs for MODEL; GenerationError (one line, with the fix) when there are none."""
    model = Path(model)
    files = find_model_files(model)
    if backend != "auto" and backend not in BACKENDS:
        raise GenerationError(f"unknown backend {backend!r}; choose one of auto, {', '.join(BACKENDS)}")
    if variant is not None and variant not in files.variants and not (variant == "model" and files.hf):
        known = sorted(files.variants) + (["model"] if files.hf else [])
        raise GenerationError(f"no variant {variant!r} in {model}; found: {', '.join(known) or 'none'}")
    if backend == "auto":
        if variant is not None:
            fmt = "hf" if variant == "model" else files.variants[variant][0]
            backend = {"hf": "torch", "onnx": "onnxruntime", "pte": "executorch", "gguf": "llamacpp"}[fmt]
        else:
            backend = next(b for b in AUTO_ORDER if FORMAT_OF_BACKEND[b] in files.formats())
    fmt = FORMAT_OF_BACKEND[backend]
    if fmt == "hf":
        if files.hf is None:
            raise GenerationError(
                f"--backend torch needs the model directory (config.json, model.safetensors) and none was found "
                f"from {model}; give the model directory itself (e.g. runs/quickstart/model)"
            )
        return Located(backend, files.hf, "model", files.hf / "tokenizer.json")
    candidates = {name: p for name, (f, p) in files.variants.items() if f == fmt}
    if variant == "model":
        raise GenerationError("variant 'model' is the torch model directory; use --backend torch (or auto) for it")
    if variant is not None:
        if files.variants[variant][0] != fmt:
            raise GenerationError(
                f"variant {variant!r} is {files.variants[variant][0]}, which --backend {backend} does not run; "
                f"choose one of: {', '.join(sorted(candidates)) or 'none found'}"
            )
        name = variant
    elif candidates:
        name = FP32_VARIANT[fmt] if FP32_VARIANT[fmt] in candidates else sorted(candidates)[0]
    else:
        what = {"onnx": "an ONNX export (model.onnx)", "pte": "an ExecuTorch export (model.pte)"}.get(
            fmt, "a GGUF export (model.gguf)"
        )
        raise GenerationError(
            f"--backend {backend} needs {what} and none was found from {model}; run effllm-export on the model "
            "directory first, or choose another --backend"
        )
    location = candidates[name]
    if location.is_file():
        # A GGUF carries its tokenizer; one effllm did not write may sit beside an unrelated tokenizer.json.
        tokenizer = None if fmt == "gguf" else location.parent / "tokenizer.json"
        return Located(backend, location, name, tokenizer)
    path = location / "model.pte" if fmt == "pte" else location
    tokenizer = location / "tokenizer.json"
    if not tokenizer.is_file() and files.hf is not None:
        tokenizer = files.hf / "tokenizer.json"
    return Located(backend, path, name, tokenizer)


def default_model() -> Path:
    """The quickstart's export, else its model directory; GenerationError when neither exists."""
    for candidate in (DEFAULT_EXPORT, DEFAULT_MODEL):
        if candidate.exists():
            return candidate
    raise GenerationError(
        f"no MODEL given and no quickstart model found ({DEFAULT_EXPORT} or {DEFAULT_MODEL}); run effllm-train "
        "and effllm-export first, or give a model directory"
    )
