"""effllm-eval: sliding-window perplexity of a model directory on held-out text, and zero-shot tasks through
lm-evaluation-harness, loading the model as a user outside effllm would."""
