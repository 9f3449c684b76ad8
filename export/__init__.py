"""effllm.export: an EfficientLLM model directory -> ONNX and ExecuTorch files, verified against torch.

    onnx_export        ONNX with explicit per-layer past/present, genai_config.json, tokenizer files
    quantize           ONNX int8 (dynamic) and int4 (MatMulNBits) variants
    executorch_export  .pte with per-layer KV-cache buffers, runner constant methods, XNNPACK, 8da4w
    verify             parity with torch (fp32) and held-out quality checks (quantized); verify.json
    cli                effllm-export

Submodules are imported on use: the exporters pull in torch.onnx and ExecuTorch, which take seconds.
"""
