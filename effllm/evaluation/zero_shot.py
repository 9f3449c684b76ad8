"""Zero-shot tasks through lm-evaluation-harness's own ``hf`` model (HFLM), so the numbers compare with
published ones. HFLM is handed the model and tokenizer effllm loaded (the installed classes, see
effllm.model.model_dir), not a path it would load with trust_remote_code (the directory's own code)."""

from __future__ import annotations

import torch

from effllm.common.errors import first_line
from effllm.evaluation.errors import EvalError

PAPER_TASKS = ["arc_easy", "arc_challenge", "boolq", "hellaswag", "openbookqa", "piqa", "winogrande", "mmlu"]


def zero_shot(model, tokenizer, tasks: list[str], limit: int | None, batch_size: int, include_path: str | None) -> dict:
    try:
        import lm_eval
        from huggingface_hub.errors import LocalEntryNotFoundError
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise EvalError("zero-shot tasks need lm-evaluation-harness: pip install 'effllm[eval]'") from None
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise EvalError(f"unknown lm-eval task(s) {unknown}; see `lm-eval ls tasks` or give --include-path")
    try:
        model = model.to("cuda" if torch.cuda.is_available() else "cpu")
        out = lm_eval.simple_evaluate(
            model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size),
            tasks=tasks,
            num_fewshot=0,
            limit=limit,
            task_manager=manager,
            log_samples=True,
        )
    except (ConnectionError, LocalEntryNotFoundError) as err:  # datasets' "Couldn't reach ... on the Hub"
        raise EvalError(
            f"the task datasets come from the Hugging Face Hub, which is not reachable ({first_line(err)}); "
            "run once online to cache them, or give local task YAMLs with --include-path"
        ) from None
    results = {
        task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        for task, metrics in out["results"].items()
    }
    samples = {task: [{"arguments": s["arguments"], "resps": s["resps"], "target": s["target"]} for s in rows]
               for task, rows in out.get("samples", {}).items()}  # fmt: skip
    return {"results": results, "samples": samples}
