"""effllm-train's engine: the run's configuration (recipe), its plan and dry run, the training loop with
pruning, its schedules (continuous, one-shot, staged), distillation, run state, checkpoints and exact
resume, torch.distributed, the run's report and the embedded quickstart. Built on model, data and
pruning; nothing but the CLI imports it."""
