"""ExecuTorch's lowering in background processes (export/lowering_workers.py): the same .pte as in-process
lowering, the worker's errors reach the caller, and the worker count fits the machine."""

from __future__ import annotations

import pytest
from effllm.export.executorch_export import export_executorch
from effllm.export.lowering_workers import LoweringJob, LoweringWorkers, worker_count
from export_helpers import MAX_SEQ_LEN, random_model_dir

from effllm import EfficientLLMForCausalLM

GIB = 1 << 30


def test_worker_count_is_one_per_pte_as_far_as_memory_holds_them():
    model = 400 * 2**20  # a ~100M-parameter model in fp32
    assert worker_count(2, model, memory_bytes=24 * GIB) == 2
    assert worker_count(1, model, memory_bytes=24 * GIB) == 1
    assert worker_count(2, model, memory_bytes=7 * GIB) == 1  # one beside the main process
    assert worker_count(2, model, memory_bytes=4 * GIB) == 0  # none: lowered in the main process
    assert worker_count(2, 4 * 1_000_000_000, memory_bytes=64 * GIB) == 1  # a 1B model


def test_a_background_lowering_writes_the_program_an_in_process_one_writes(tokenizer, tmp_path):
    _, model_dir = random_model_dir("odd", tokenizer)
    model = EfficientLLMForCausalLM.from_pretrained(model_dir)
    here = export_executorch(model, tmp_path / "here", MAX_SEQ_LEN, None, model_dir=model_dir)
    jobs = [LoweringJob("executorch", tmp_path / "staging" / "executorch", None)]
    workers = LoweringWorkers(jobs, 1, model_dir, MAX_SEQ_LEN, 32, None)
    try:
        seconds = workers.wait("executorch")
    finally:
        workers.close()
    there = tmp_path / "staging" / "executorch" / "model.pte"
    assert seconds > 0 and there.read_bytes() == here.read_bytes()
    assert (there.parent / "tokenizer.json").is_file()
    assert not list((tmp_path / "staging").glob(".*"))  # the outcome file is read and removed


def test_a_lowering_that_fails_in_its_worker_raises_its_error_in_the_caller(tokenizer, tmp_path):
    _, model_dir = random_model_dir("odd", tokenizer)
    jobs = [LoweringJob("executorch-bogus", tmp_path / "executorch-bogus", "bogus")]
    workers = LoweringWorkers(jobs, 1, model_dir, MAX_SEQ_LEN, 32, None)
    try:
        with pytest.raises(RuntimeError, match="lowering of executorch-bogus failed in its worker: ValueError: "
                                               "unknown ExecuTorch quantization 'bogus'"):  # fmt: skip
            workers.wait("executorch-bogus")
    finally:
        workers.close()
    assert all(not p.is_alive() for p in workers.processes)
