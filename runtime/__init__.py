"""effllm.runtime: generate text with, and benchmark, exported EfficientLLM models on CPUs and phones.

    sampling            greedy / temperature / top-k / top-p / seed, in numpy: one implementation for all
    generate            the generator interface (TextGenerator), streaming, finding a model's files
    torch_backend       eager PyTorch on the model directory (the reference)
    onnx_backend        model.onnx in our own numpy + onnxruntime loop (IO binding); imports no torch
    genai_backend       the ONNX directory in onnxruntime-genai
    executorch_backend  model.pte in the ExecuTorch runtime, and in its C++ LLM runner (as on Android)
    bench               effllm-bench: load, TTFT, prefill/decode speed, memory, roofline -> JSON/Markdown/PNG
    android             effllm-bench --target android: ExecuTorch's llama runner on a phone over adb
    cli                 effllm-generate, effllm-bench

Quick use:

    from effllm.runtime.generate import load_generator
    gen = load_generator("runs/quickstart/export", backend="onnxruntime")
    for piece in gen.stream("The return statement", max_new_tokens=64):
        print(piece, end="", flush=True)

Nothing is imported here, so ``import effllm.runtime.onnx_backend`` stays free of torch.
"""
