"""effllm.export: an EfficientLLM model directory -> ONNX and ExecuTorch files, verified against torch.

    onnx_export        ONNX with explicit per-layer past/present, genai_config.json, tokenizer files
    quantize           ONNX int8 (dynamic) and int4 (MatMulNBits) variants
    executorch_export  .pte with per-layer KV-cache buffers, runner constant methods, XNNPACK, 8da4w
    verify             the checks and thresholds: parity with torch (fp32), held-out quality (quantized)
    verify_report      verify.json, verify.md and the printed table
    verifier           runs each exported file in its effllm.runtime backend against the torch reference
    heldout            the held-out text the quantized checks use
    inputs             effllm-export's input checks -> a Plan (bad input: one line, exit 2)
    pipeline           export, verify and publish every variant of a Plan (a missed threshold: exit 1)
    cli                effllm-export's command line

The formats: docs/formats.md. Runs on effllm.runtime (its backends, its native-library helpers).
Submodules are imported on use: the exporters pull in torch.onnx and ExecuTorch, which take seconds.
"""
