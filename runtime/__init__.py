"""effllm.runtime: generate text with, and benchmark, exported EfficientLLM models on CPUs and phones.

    backend             the backend contract (Backend, GenerationError, GenerationStats); numpy only
    native              native-library helpers: muting C++ output, loading ExecuTorch's LLM kernels
    sampling            greedy / temperature / top-k / top-p / seed, in numpy: one implementation for all
    model_files         finding a model's files: the model directory, the export variants
    generate            the generator (TextGenerator): prefill, sampling, EOS, streaming text
    torch_backend       eager PyTorch on the model directory (the reference)
    onnx_backend        model.onnx in our own numpy + onnxruntime loop (IO binding); imports no torch
    genai_backend       the ONNX directory in onnxruntime-genai
    executorch_backend  model.pte in the ExecuTorch runtime, and in its C++ LLM runner (as on Android)
    bench               effllm-bench's run: bench_targets (what to run), bench_worker (one measurement in its
                        own process), machine (CPU, load, bandwidth), roofline, bench_report (JSON/Markdown/PNG)
    android             effllm-bench --target android: ExecuTorch's llama runner on a phone over adb
    cli                 effllm-generate, effllm-bench (their parser: effllm.common.cli_args, shared by every command)

effllm.export builds on this package (never the other way round); the formats it writes and what a
runtime needs for them: docs/formats.md.

Quick use:

    from effllm.runtime.generate import load_generator
    gen = load_generator("runs/quickstart/export", backend="onnxruntime")
    for piece in gen.stream("The return statement", max_new_tokens=64):
        print(piece, end="", flush=True)

Nothing is imported here, so ``import effllm.runtime.onnx_backend`` stays free of torch.
"""
