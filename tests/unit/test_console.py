"""The default console: raylm's lines and real warnings kept, Ray's and DeepSpeed's chatter dropped (raylm/log.py)."""

import pytest

from raylm.log import keep_on_console, split_for_console

# Lines as Ray forwards them from a `raylm train` of tiny.yaml (Ray 2.60, Ray Train v2, DeepSpeed 0.19.8).
DROPPED = [
    "Requesting resources: {'CPU': 0.5} * 2",
    "Setting up process group for: env:// [rank=0, world_size=2]",
    "[2026-12-02 04:17:00,819 E 8773 8840] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and ID: "
    "'dcbf28b73f4ca5a634df915201000000' has constructor arguments in the object store and max_restarts > 0.",
    "[2026-12-02 04:17:01,008] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU. If "
    "you have GPU or other accelerator, we were unable to detect it.",
    "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully",
    "SEED_LAYERS=False BASE_SEED=1234 SEED_FN=None",
    "Using topology: {ProcessCoord(pipe=0, data=0, model=0): 0, ProcessCoord(pipe=1, data=0, model=0): 1}",
    "stage=0 layers=4",
    "     0: EmbeddingPipe",
    "  loss: vocab_parallel_cross_entropy",
    "Progress bars disabled. To enable, set `ray.data.DataContext.get_current().enable_progress_bars = True`.",
    "Reporting training result 1: TrainingReport(checkpoint=None, metrics={'step': 19, 'loss': 6.14})",
    "  return Variable._execution_engine.run_backward(  # Calls into the C++ engine to run the backward pass",
    "2026-12-02 04:16:13,241\tINFO streaming_executor.py:215 -- Starting execution of Dataset dataset_0",
    "2026-12-02 04:16:31,421\tWARNING authentication_token_setup.py:85 -- Token authentication is enabled for this "
    "Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.",
]
KEPT = [
    "[raylm r0] step 5/20 | loss 7.3878 | lr 7.50e-04 | batch 16 | 1.4k tok/s | mfu 6.4% | data wait 0.4%",
    "[raylm r0] step 20/20 | loss 6.1462 | eta 0:00 | val_loss 6.4109 (ppl 608.4)",
    "[raylm r1] checkpoint step-00000010 failed its manifest check; resuming from step-00000005",
    "/x/site-packages/torch/nn/modules/module.py:1: UserWarning: some real problem",
    "2026-12-02 04:17:00,819\tWARNING worker.py:1 -- A worker died or was killed while executing a task",
    "2026-12-02 04:17:00,819\tERROR worker.py:1 -- Unhandled error (suppress with RAY_IGNORE_UNHANDLED_ERRORS=1)",
    "[2026-12-02 04:17:00,819 E 8773 8840] raylet.cc:10: the node ran out of memory",
    "Traceback (most recent call last):",
    "Warning: The following resource request cannot be scheduled right now: {'GPU': 1.0}.",
    "Error: No available node types can fulfill resource request {'GPU': 1.0}. Add suitable node types.",
    "torch.OutOfMemoryError: CUDA out of memory.",
]


@pytest.mark.parametrize("line", DROPPED)
def test_chatter_is_dropped(line):
    assert not keep_on_console(line)


@pytest.mark.parametrize("line", KEPT)
def test_raylm_lines_and_real_warnings_are_kept(line):
    assert keep_on_console(line)


def test_a_batch_splits_into_bare_raylm_lines_and_prefixed_warnings():
    batch = {"pid": 8943, "actor_name": "RayTrainWorker", "is_err": True, "lines": [*DROPPED, *KEPT]}
    own, other = split_for_console(batch)
    assert own == [line for line in KEPT if line.startswith("[raylm r")]
    assert other == [line for line in KEPT if not line.startswith("[raylm r")]


def test_the_driver_printer_swap_works_on_the_pinned_ray(monkeypatch):
    """Ray's driver prints forwarded lines through a named handler; the swap must find it on the pinned Ray."""
    from ray._private import worker as ray_worker

    from raylm import log

    printed = []
    monkeypatch.setattr(
        ray_worker,
        "print_to_stdstream",
        lambda batch, ignore_prefix: printed.append((batch["lines"], ignore_prefix)),
    )
    dispatcher = ray_worker.global_worker_stdstream_dispatcher
    monkeypatch.setattr(
        dispatcher, "handlers", [("ray_print_logs", lambda batch: printed.append("unfiltered"))]
    )
    log._swap_ray_log_printer()
    dispatcher.emit({"pid": 1, "is_err": True, "lines": [KEPT[0], DROPPED[0], KEPT[3]]})
    assert printed == [([KEPT[0]], True), ([KEPT[3]], False)]
