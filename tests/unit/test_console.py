"""The default console shows raylm's lines only: Ray's, Ray Train's, DeepSpeed's and torch's stay in the log files
(raylm/log.py). Whole runs' consoles are checked line by line in tests/ray/test_console_runs.py."""

import os
import sys

import pytest

from raylm.log import CONSOLE_LINE, keep_on_console, split_for_console

# Lines as Ray forwards them from `raylm train` runs (Ray 2.60, Ray Train v2, DeepSpeed 0.19.8, torch 2.13): a pp=2
# tp=2 run, a run with a worker killed, a resume under another layout.
DROPPED = [
    "Requesting resources: {'CPU': 0.5} * 2",
    "Setting up process group for: env:// [rank=0, world_size=2]",
    "[2026-12-02 04:17:00,819 E 8773 8840] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and ID: "
    "'dcbf28b73f4ca5a634df915201000000' has constructor arguments in the object store and max_restarts > 0.",
    "[2026-12-02 04:17:01,008] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU. If "
    "you have GPU or other accelerator, we were unable to detect it.",
    "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully",
    "Using topology: {ProcessCoord(pipe=0, data=0, model=0): 0, ProcessCoord(pipe=1, data=0, model=0): 1}",
    "Progress bars disabled. To enable, set `ray.data.DataContext.get_current().enable_progress_bars = True`.",
    "Reporting training result 1: TrainingReport(checkpoint=None, metrics={'step': 19, 'loss': 6.14})",
    "2026-12-02 04:16:31,421\tWARNING authentication_token_setup.py:85 -- Token authentication is enabled for this "
    "Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.",
    "WARNING: 8 PYTHON worker processes have been started on node: 6097c434fda596dcdcd3b5fc7323cbde5a9e20878dea2bbe8e"
    "c7eb5b with address: 192.0.2.2, which is 4x the maximum expected startup concurrency (2).",
    "Error: Training failed due to worker errors:",
    "ray.train.WorkerGroupError: Training failed due to worker errors:",
    "Traceback (most recent call last):",
    "ray.exceptions.ActorDiedError: The actor died unexpectedly before finishing this task.",
    "RuntimeError: [/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
    "[127.0.0.1]:2473. This is typically caused by a remote worker crashing. GLHF!",
    "A worker died or was killed while executing a task by an unexpected system error.",
    "[2026-12-07 22:47:43,566 E 9182 9630] logging.cc:474: *** SIGABRT received at time=1796683663 on cpu 1 ***",
    "/x/site-packages/torch/distributed/distributed_c10d.py:4091: FutureWarning: `torch.distributed._all_gather_base`"
    " is a private function and will be deprecated. Please use `torch.distributed.all_gather_into_tensor` instead.",
]
KEPT = [
    "[raylm r0] step 5/20 | loss 7.3878 | lr 7.50e-04 | batch 16 | 1.4k tok/s | mfu 6.4% | data wait 0.4%",
    "[raylm r0] step 20/20 | loss 6.1462 | eta 0:00 | val_loss 6.4109 (ppl 608.4)",
    "[raylm r1] checkpoint step-00000010 failed its manifest check; resuming from step-00000005",
    "[raylm r0] rank 1 on node 3e61f5 died (SIGKILL); restarting from step 10, failure 1 of 6",
]


@pytest.mark.parametrize("line", DROPPED)
def test_other_lines_stay_off_the_console(line):
    assert not keep_on_console(line) and not CONSOLE_LINE.match(line)


@pytest.mark.parametrize("line", KEPT)
def test_raylm_lines_are_kept(line):
    assert keep_on_console(line) and CONSOLE_LINE.match(line)


def test_a_batch_keeps_raylm_lines_and_the_autoscaler_keeps_its_own():
    batch = {"pid": 8943, "actor_name": "RayTrainWorker", "is_err": True, "lines": [*DROPPED, *KEPT]}
    assert split_for_console(batch) == (KEPT, [])
    waiting = ["Warning: The following resource request cannot be scheduled right now: {'GPU': 1.0}."]
    assert split_for_console({"pid": "autoscaler", "is_err": False, "lines": waiting}) == ([], waiting)


def test_the_driver_printer_swap_works_on_the_pinned_ray(monkeypatch, capsys):
    """Ray's driver prints forwarded lines through a named handler; the swap must find it on the pinned Ray. raylm's
    lines are printed as they are (no prefix, colour or de-duplication), the autoscaler's through Ray's printer, the
    raylet's not at all."""
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
    dispatcher.emit({"pid": "autoscaler", "is_err": False, "lines": ["Warning: no node fits {'GPU': 1.0}"]})
    # the raylet's messages to the driver: Ray's listen_error_messages calls print_to_stdstream by name
    ray_worker.print_to_stdstream(
        {"pid": "raylet", "is_err": False, "lines": [DROPPED[9]]}, ignore_prefix=False
    )
    assert capsys.readouterr().err.splitlines() == [KEPT[0], KEPT[3]]
    assert printed == [(["Warning: no node fits {'GPU': 1.0}"], False)]


def test_no_colour_codes_when_stdout_is_not_a_terminal(monkeypatch):
    from raylm.log import no_colour_when_piped

    monkeypatch.delenv("RAY_COLOR_PREFIX", raising=False)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    no_colour_when_piped()
    assert os.environ["RAY_COLOR_PREFIX"] == "0"
