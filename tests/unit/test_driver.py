"""Driver pieces that need no cluster: worker resources from the layout, run-folder policy, RAY_ADDRESS probing."""

import os
import time

import pytest

from raylm.config import resolve
from raylm.errors import RaylmError
from raylm.ray_connect import connect_ray
from raylm.train.driver import scaling_for
from raylm.train.run_folder import prepare_run_dir


def test_cpu_cluster_gets_fractional_cpus_that_leave_one_for_ray_data():
    scaling, backend = scaling_for(resolve({}, ["parallel.pp=2"]), {"CPU": 2.0})
    assert backend == "gloo" and not scaling.use_gpu
    assert scaling.num_workers == 2 and scaling.resources_per_worker == {"CPU": 0.5}
    scaling, _ = scaling_for(resolve({}, ["parallel.pp=2", "parallel.tp=2", "parallel.dp=2"]), {"CPU": 4.0})
    assert scaling.num_workers == 8 and scaling.resources_per_worker["CPU"] == pytest.approx(0.35)


def test_gpu_cluster_gets_one_gpu_per_worker_and_nccl():
    cfg = resolve({}, ["parallel.pp=2", "parallel.tp=2", "parallel.dp=4"])
    scaling, backend = scaling_for(cfg, {"CPU": 200.0, "GPU": 16.0})
    assert backend == "nccl" and scaling.use_gpu and scaling.num_workers == 16
    assert scaling.resources_per_worker == {"CPU": 1.0, "GPU": 1}


def test_asking_for_gpus_the_cluster_lacks_is_one_clear_error():
    with pytest.raises(RaylmError, match="parallel.use_gpu=true needs 2 GPUs .* but the cluster has 0"):
        scaling_for(resolve({}, ["parallel.pp=2", "parallel.use_gpu=true"]), {"CPU": 8.0})


def test_used_run_name_is_refused_without_overwrite(tmp_path):
    cfg = resolve({}, [f"run.dir={tmp_path}", "run.name=r1"])
    run = prepare_run_dir(cfg, overwrite=False)
    assert (run / "config.yaml").exists()
    (run / "metrics.jsonl").write_text('{"step": 0}\n')
    other = resolve({}, [f"run.dir={tmp_path}", "run.name=r1", "run.seed=7"])
    with pytest.raises(
        RaylmError, match="already holds a run named 'r1' .*another config.yaml.*; pass --overwrite"
    ):
        prepare_run_dir(other, overwrite=False)
    assert (run / "metrics.jsonl").exists()  # nothing overwritten
    with pytest.raises(RaylmError, match="already holds a run named 'r1' .*resume=never.*; pass --overwrite"):
        prepare_run_dir(resolve({}, [f"run.dir={tmp_path}", "run.name=r1", "checkpoint.resume=never"]), False)
    assert prepare_run_dir(cfg, overwrite=False) == run  # the same command before any commit: starts again
    assert (run / "metrics.jsonl").exists()  # its rows go when the new attempt's rank 0 starts writing
    prepare_run_dir(cfg, overwrite=True)
    assert not (run / "metrics.jsonl").exists()


def test_unwritable_storage_is_named(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cfg = resolve({}, [f"run.dir={blocker}"])
    with pytest.raises(RaylmError, match="is not writable .* point run.dir at a writable folder"):
        prepare_run_dir(cfg, overwrite=False)


def test_ray_address_that_does_not_answer_fails_fast(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")  # discard port: nothing listens
    start = time.perf_counter()
    with pytest.raises(RaylmError, match="no Ray cluster answers at RAY_ADDRESS=127.0.0.1:9"):
        connect_ray(connect_timeout_s=5)
    assert time.perf_counter() - start < 30


def test_malformed_ray_address_names_the_fix(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "headnode")
    with pytest.raises(RaylmError, match="is not host:port"):
        connect_ray()


@pytest.mark.parametrize("remote", [False, True])
def test_raylm_jobs_shorten_ray_trains_process_group_shutdown_wait(monkeypatch, remote):
    import ray

    from raylm import ray_connect as ray_cluster

    inits = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: inits.append(kwargs))
    monkeypatch.setattr(ray_cluster, "quiet_ray_driver_loggers", lambda: None)
    monkeypatch.setattr(ray_cluster, "filter_forwarded_logs", lambda: None)
    monkeypatch.setenv("RAY_ADDRESS", "auto" if remote else "")  # "auto": no probe
    monkeypatch.delenv("TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S", raising=False)
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")  # connect_ray sets it when absent
    monkeypatch.delenv(ray_cluster.PREEMPTION_WATCHER_ENV, raising=False)  # a local start sets it
    connect_ray()
    inherited = os.environ.get("TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S")
    # a value the driver already has reaches the actors without raylm (a local Ray inherits it, a submitted
    # job carries it), and Ray refuses a job whose runtime_env sets a variable the submission set
    monkeypatch.setenv("TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S", "12")
    connect_ray()
    short_wait = {"env_vars": {"TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S": "5"}}
    if remote:
        assert [init["runtime_env"] for init in inits] == [short_wait, None]
        assert inherited is None
    else:  # a local Ray's processes inherit the driver's environment: the job's variables go there
        assert [init.get("runtime_env") for init in inits] == [None, None]
        assert inherited == "5" and os.environ["TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S"] == "12"
