"""The model: effllm's configuration and modeling code (copied into every saved model directory, so they
import nothing of effllm), conversion from Llama-family checkpoints, parameter counting, well-known sources'
shapes and the quickstart's tokenizer. Every other stage builds on it; it imports only effllm.common."""
