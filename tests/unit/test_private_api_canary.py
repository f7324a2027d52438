"""Canary for the private Ray, torch and DeepSpeed hooks raylm relies on: fails when an upgrade moves one.

One test per hook, named after the raylm module that uses it; docs/private-apis.md says why each hook has no
public replacement. A failure here means: read the new library's code, adapt the raylm module, then this test.
"""

from __future__ import annotations

import importlib.util
import inspect

import ray
import ray.train.constants
import ray.train.v2._internal.constants
import torch.distributed as dist
from deepspeed.comm.torch import TorchBackend
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import _AutoscalingCoordinatorActor
from ray.train import FailureConfig, ScalingConfig
from ray.train.torch.config import _TorchBackend
from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError
from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy
from ray.train.v2._internal.execution.failure_handling.failure_policy import FailureDecision
from ray.train.v2._internal.execution.scaling_policy import (
    AUTOSCALING_REQUESTS_GET_TIMEOUT_S,
    NoopDecision,
    ResizeDecision,
    ScalingDecision,
    ScalingPolicy,
)
from ray.train.v2._internal.execution.scaling_policy.elastic import ElasticScalingPolicy
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

from raylm.parallel.pipe_wait import WAIT_INSTRUCTIONS
from raylm.ray_connect import PG_SHUTDOWN_WAIT_ENV, PREEMPTION_WATCHER_ENV


def params(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def source(obj) -> str:
    return inspect.getsource(obj)


def defines(cls, signature: str) -> bool:
    """Whether cls's source defines `def <signature>:` (DeepSpeed's nvtx decorator hides the signature)."""
    return f"    def {signature}:" in source(cls)


# --- Ray ------------------------------------------------------------------------------------------


def test_ray_train_controller_hooks_of_raylm_train_trainer():
    assert "failure_policy" in source(DataParallelTrainer.fit)  # passed to the method we override
    assert "scaling_policy" in source(DataParallelTrainer.fit)
    assert callable(DataParallelTrainer._initialize_and_run_controller)
    run_controller = inspect.signature(DataParallelTrainer._initialize_and_run_controller).parameters
    assert [p.kind for p in run_controller.values()] == [
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.VAR_KEYWORD,
    ]
    assert params(DataParallelTrainer._register_sigint_handler) == ["self", "controller"]
    run_controller_source = source(DataParallelTrainer._initialize_and_run_controller)
    assert "_register_sigint_handler(controller)" in run_controller_source
    # the callbacks keyword RaylmTrainer filters, and the cleaner it leaves out on a local Ray without dashboard
    assert "callbacks=self._create_default_callbacks()" in source(DataParallelTrainer.fit)
    assert "PlacementGroupCleanerCallback()" in source(DataParallelTrainer._create_default_callbacks)
    assert ray.train.v2._internal.constants.ENABLE_PREEMPTION_WATCHER_ENV_VAR == PREEMPTION_WATCHER_ENV


def test_ray_train_failure_policy_of_raylm_train_failure_policy():
    assert params(DefaultFailurePolicy.make_decision) == ["self", "training_failed_error"]
    assert params(DefaultFailurePolicy.__init__)[:2] == ["self", "failure_config"]
    DefaultFailurePolicy(FailureConfig(max_failures=1))
    assert {FailureDecision.RAISE, FailureDecision.RETRY} <= set(FailureDecision)
    # raylm.train.fault_lines finds a dead worker's ActorDiedError behind Ray Train's health-check failure
    assert WorkerHealthCheckFailedError("x", ValueError()).health_check_failure.__class__ is ValueError


def test_ray_train_scaling_policy_of_raylm_train_scaling_policy():
    for name in (
        "_count_possible_workers",
        "_get_reserved_resources",
        "_get_resize_decision",
        "make_decision_for_running_worker_group",
        "make_decision_for_non_running_worker_group",
        "_maybe_send_resource_request",
        "before_controller_abort",
    ):
        assert callable(getattr(ElasticScalingPolicy, name)), name  # raylm overrides or calls it
    assert inspect.iscoroutinefunction(ElasticScalingPolicy.before_controller_shutdown)
    assert params(ElasticScalingPolicy._count_possible_workers) == ["self", "reserved_resources"]
    assert params(ElasticScalingPolicy._get_resize_decision) == ["self", "num_workers"]
    assert params(ElasticScalingPolicy.make_decision_for_running_worker_group) == [
        "self",
        "worker_group_state",
        "worker_group_status",
    ]
    # the overridden _get_reserved_resources is the only way Ray's policy reads the reservation
    for caller in (
        ElasticScalingPolicy.make_decision_for_non_running_worker_group,
        ElasticScalingPolicy.make_decision_for_running_worker_group,
    ):
        assert "self._get_reserved_resources()" in source(caller)
    assert isinstance(ElasticScalingPolicy.GET_RESERVED_RESOURCES_INTERVAL_S, (int, float))
    assert isinstance(AUTOSCALING_REQUESTS_GET_TIMEOUT_S, (int, float))
    assert isinstance(ScalingPolicy._autoscaling_coordinator, property)
    policy = ElasticScalingPolicy(ScalingConfig(num_workers=(2, 4)))
    assert policy._requester_id is None and policy.scaling_config.max_workers == 4  # set when a run starts
    assert "recompute" in inspect.signature(_AutoscalingCoordinatorActor.get_reserved_resources).parameters
    assert ScalingConfig(num_workers=2)._resources_per_worker_not_none == {"CPU": 1}
    assert issubclass(NoopDecision, ScalingDecision) and "num_workers" in ResizeDecision.__annotations__


def test_ray_node_health_settings_of_raylm_train_scaling_policy():
    assert isinstance(ray._config.health_check_period_ms(), int)  # node_death_s: else it falls back to 17 s
    assert isinstance(ray._config.health_check_failure_threshold(), int)


def test_ray_torch_backend_reads_the_shutdown_wait_raylm_sets():
    assert PG_SHUTDOWN_WAIT_ENV in source(_TorchBackend.on_shutdown)  # the wait raylm shortens
    assert ray.train.constants.TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S == PG_SHUTDOWN_WAIT_ENV


def test_ray_driver_log_printer_of_raylm_log():
    from ray._private import worker as ray_worker

    dispatcher = ray_worker.global_worker_stdstream_dispatcher
    assert isinstance(dispatcher.handlers, list)
    assert params(dispatcher.add_handler) == ["name", "handler"]
    assert params(dispatcher.remove_handler) == ["name"]
    assert params(ray_worker.print_to_stdstream) == ["data", "ignore_prefix"]
    assert '"ray_print_logs",' in source(ray_worker.connect)  # the name of the handler raylm swaps
    # the raylet's messages reach the driver's console through the module's printer, looked up by name
    assert "print_to_stdstream(" in source(ray_worker.listen_error_messages)
    # quiet_ray_driver_loggers silences this module's logger by name
    assert importlib.util.find_spec("ray._private.authentication.authentication_token_setup") is not None


# --- torch ----------------------------------------------------------------------------------------


def test_torch_new_group_as_raylm_parallel_shared_groups_intercepts_it():
    assert params(dist.new_group)[:2] == ["ranks", "timeout"]  # a positional second argument is a timeout
    # DeepSpeed's groups go through the module attribute at call time, so the interception sees them too
    assert "torch.distributed.new_group(" in source(TorchBackend.new_group)


def test_torch_collectives_as_raylm_parallel_comm_wait_times_them():
    for name in ("all_reduce", "broadcast", "send", "recv", "all_gather", "reduce_scatter_tensor"):
        assert hasattr(dist, name), name
    # DeepSpeed's collectives go through the module attributes at call time, so the timed wrappers see them
    backend = source(inspect.getmodule(TorchBackend))
    for call in ("all_reduce(", "broadcast(", "send(", "recv(", "all_gather("):
        assert f"torch.distributed.{call}" in backend, call


def test_torch_logger_raylm_compress_quantize_quiets():
    assert importlib.util.find_spec("torch.utils._pytree") is not None


# --- DeepSpeed ------------------------------------------------------------------------------------


def test_deepspeed_pipeline_instruction_map_of_raylm_parallel_pipe_wait():
    instruction_map = PipelineEngine._INSTRUCTION_MAP
    assert isinstance(instruction_map, dict) and set(WAIT_INSTRUCTIONS) <= set(instruction_map)
    for instruction in WAIT_INSTRUCTIONS:
        assert params(instruction_map[instruction])[0] == "self", instruction
    # looked up on the instance at each instruction (so the engine's own copy wins), called with its kwargs
    schedule_source = source(PipelineEngine._exec_schedule)
    assert "self._INSTRUCTION_MAP[type(cmd)]" in schedule_source and "(**cmd.kwargs)" in schedule_source


def test_deepspeed_optimizer_state_links_of_raylm_parallel_param_state():
    for optimizer in (DeepSpeedZeroOptimizer, BF16_Optimizer):
        assert params(optimizer._lazy_init_hp_params_optimizer_state) == ["self"], optimizer
        relink = source(optimizer._lazy_init_hp_params_optimizer_state)
        assert "if not self._hp_optimizer_states_linked:" in relink, optimizer
        assert "_hp_mapping" in source(optimizer), optimizer  # what param_state.is_partitioned looks for
    stage3 = DeepSpeedZeroOptimizer_Stage3
    assert defines(stage3, "_reassign_or_swap_out_partitioned_parameters(self, sub_group_id)")
    assert params(stage3.invalidate_secondary_tensor) == ["self"]
    assert "self.fp16_partitioned_groups_flat = " in source(stage3)
    assert "self.persistent_parameters = " in source(stage3)


def test_deepspeed_overflow_branches_of_raylm_parallel_step_guard():
    zero_1_2 = DeepSpeedZeroOptimizer
    assert "self.check_grad_overflow = " in source(zero_1_2.__init__)
    step_source = source(zero_1_2.step)
    assert "if self.check_grad_overflow:" in step_source and "self.check_overflow(" in step_source
    assert params(zero_1_2.check_overflow) == ["self", "partition_gradients"]
    stage3 = DeepSpeedZeroOptimizer_Stage3
    assert defines(stage3, "_overflow_check_and_loss_scale_update(self, update_scale=True)")
    assert defines(stage3, "_loss_scale_update_and_overflow_cleanup(self)")
    assert "self._overflow_check_and_loss_scale_update(update_scale=False)" in source(stage3)  # in step()
    assert params(BF16_Optimizer.clear_hp_grads) == ["self"] and callable(BF16_Optimizer.clear_lp_grads)
    assert "self.fp32_groups_gradients_flat = " in source(BF16_Optimizer)


def test_deepspeed_autotuner_imports_mlflow_of_raylm_parallel_ds_import():
    from deepspeed.autotuning import autotuner

    assert "    import mlflow\n" in source(autotuner)  # what import_deepspeed keeps from running
