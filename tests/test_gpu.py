"""The GPU paths, run for real when CUDA is present (`make test` runs them; skipped cleanly without CUDA).

- NT-Xent with negatives gathered over NCCL (2 Ray Train workers on 2 GPUs, 1 on one GPU) equals the loss and
  gradients of one process on the whole batch;
- `selfsup pretrain` on the GPU(s) under Ray Train, then `--resume` of that run on the CPU (another GPU layout:
  none), and a local one-GPU resume;
- every fine-tuning method, `distill` and `fixmatch` included, in-process, as Ray tasks and (2 GPUs) under Ray
  Train DDP, then `selfsup predict` with the shipped classifier;
- `selfsup select` and `selfsup inspect` encoding on the driver's GPU and in GPU Ray tasks;
- `selfsup bench --parts model,end_to_end` on the GPU.
The CPU stand-ins for what can be checked without a GPU are in tests/test_placement.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import test_gather
import torch
from test_gather import GLOBAL_BATCH, TEMPERATURE, fixed_batch, fixed_projection

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
GPUS = torch.cuda.device_count() if CUDA else 0
WORLD = min(2, GPUS)  # NCCL wants one GPU per rank

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")]

TINY = ["model.timm_kwargs={channels: [8, 16, 32, 64]}", "model.proj_hidden_dim=64", "model.proj_output_dim=32"]


def _cli(args: list[str], env: dict[str, str] | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """The real `selfsup` command in a child process (its own CUDA context and Ray driver)."""
    full_env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "WANDB_MODE": "offline", **(env or {})}
    full_env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "cluster", *args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def _ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from shards.writer import write_shards

    d = tmp_path_factory.mktemp("gpu") / "shards"
    write_shards("digits", d, labeled_fractions=(0.1,), seed=0, workers=1)
    return d


# ------------------------------------------------------------------ gathered NT-Xent over NCCL


def _nccl_worker(config):
    import ray.train
    import ray.train.torch
    import torch.distributed as dist
    from lightly.loss import NTXentLoss

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    assert dist.get_backend() == "nccl"
    device = ray.train.torch.get_device()
    assert device.type == "cuda"
    b = GLOBAL_BATCH // world
    x0, x1 = fixed_batch()
    x0 = x0[rank * b:(rank + 1) * b].to(device).requires_grad_(True)
    x1 = x1[rank * b:(rank + 1) * b].to(device).requires_grad_(True)
    model = ray.train.torch.prepare_model(fixed_projection())
    z0, z1 = model(torch.cat([x0, x1])).chunk(2)
    loss = NTXentLoss(temperature=TEMPERATURE, gather_distributed=True)(z0, z1)
    loss.backward()
    lin = model.module if hasattr(model, "module") else model
    torch.save({"loss": loss.detach().cpu(), "x0_grad": x0.grad.cpu(), "w_grad": lin.weight.grad.cpu(),
                "world": torch.tensor(world)}, f"{config['out']}/rank{rank}.pt")


def test_gathered_ntxent_over_nccl_matches_one_process(tmp_path):
    import ray
    import ray.cloudpickle
    from lightly.loss import NTXentLoss
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ray.init(address="local", num_cpus=max(2, WORLD), num_gpus=WORLD, include_dashboard=True,
             dashboard_host="127.0.0.1", log_to_driver=False)
    try:
        # neither test module is importable inside the workers: ship the worker and its helpers by value
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        ray.cloudpickle.register_pickle_by_value(test_gather)
        TorchTrainer(_nccl_worker, train_loop_config={"out": str(tmp_path)}, torch_config=TorchConfig(backend="nccl"),
                     scaling_config=ScalingConfig(num_workers=WORLD, use_gpu=True),
                     run_config=RunConfig(name="nccl", storage_path=str(tmp_path / "ray"))).fit()
    finally:
        ray.shutdown()
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    x0, x1 = (x.clone().requires_grad_(True) for x in fixed_batch())
    lin = fixed_projection()
    z0, z1 = lin(torch.cat([x0, x1])).chunk(2)
    single = NTXentLoss(temperature=TEMPERATURE)(z0, z1)
    single.backward()
    assert abs(float(torch.stack([r["loss"] for r in ranks]).mean()) - float(single)) < 1e-4
    b = GLOBAL_BATCH // WORLD
    for rank, r in enumerate(ranks):
        assert int(r["world"]) == WORLD
        torch.testing.assert_close(r["w_grad"], lin.weight.grad, atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(r["x0_grad"] / WORLD, x0.grad[rank * b:(rank + 1) * b], atol=1e-4, rtol=1e-3)


# ------------------------------------------------------------------ pretraining on the GPU, resumed elsewhere


@pytest.fixture(scope="module")
def gpu_run(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "run"
    _ok(_cli(["pretrain", "--config", "configs/digits.yaml", f"output_dir={out}", f"data.shards={shards}",
              "pretrain.epochs=1", "pretrain.global_batch_size=128", "pretrain.knn_every=1", "trainer.use_gpu=true",
              f"trainer.num_workers={WORLD}", *TINY]))
    return out


def test_pretraining_on_the_gpu_writes_the_encoder_on_the_driver(gpu_run):
    meta = json.loads((gpu_run / "encoder.json").read_text())
    metrics = [json.loads(x) for x in (gpu_run / "metrics.jsonl").read_text().splitlines()]
    assert meta["epochs"] == 1 and [m["epoch"] for m in metrics] == [1] and metrics[0]["nonfinite_steps"] == 0
    assert (gpu_run / "encoder.safetensors").is_file()


def test_a_gpu_run_resumes_on_the_cpu_and_on_one_gpu(gpu_run, tmp_path):
    import shutil

    cpu = tmp_path / "cpu"
    shutil.copytree(gpu_run, cpu)  # the checkpoints live under <output_dir>/ray by default
    _ok(_cli(["pretrain", "--local", "--resume", str(cpu), "pretrain.epochs=2"], env={"CUDA_VISIBLE_DEVICES": ""}))
    assert [json.loads(x)["epoch"] for x in (cpu / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    one = tmp_path / "one"
    shutil.copytree(gpu_run, one)
    _ok(_cli(["pretrain", "--local", "--resume", str(one), "pretrain.epochs=2"], env={"CUDA_VISIBLE_DEVICES": "0"}))
    assert json.loads((one / "encoder.json").read_text())["epochs"] == 2


@pytest.mark.skipif(GPUS < 2, reason="needs 2 GPUs: a local run that sees them all, resumed on one")
def test_a_local_run_on_every_gpu_resumes_on_one(shards, tmp_path):
    """The checkpoint holds one CUDA RNG state per visible GPU; a resume that sees fewer must not raise."""
    out = tmp_path / "all"
    _ok(_cli(["pretrain", "--local", "--config", "configs/digits.yaml", f"output_dir={out}", f"data.shards={shards}",
              "pretrain.epochs=1", "pretrain.global_batch_size=128", "pretrain.knn_every=0", *TINY]))
    _ok(_cli(["pretrain", "--local", "--resume", str(out), "pretrain.epochs=2"], env={"CUDA_VISIBLE_DEVICES": "0"}))
    assert json.loads((out / "encoder.json").read_text())["epochs"] == 2


# ------------------------------------------------------------------ fine-tuning on the GPU, then predict


MODES = ["local", "tasks"] + (["train"] if WORLD >= 2 else [])


@pytest.mark.parametrize("semi_method", ["distill", "fixmatch"])
@pytest.mark.parametrize("mode", MODES)
def test_every_finetune_method_on_the_gpu_then_predict(gpu_run, shards, tmp_path, mode, semi_method):
    out = tmp_path / "ft"
    workers = {"local": "trainer.num_workers=0", "tasks": "trainer.num_workers=2",
               "train": f"finetune.num_workers={WORLD}"}[mode]
    _ok(_cli(["finetune", "--config", "configs/digits.yaml", f"output_dir={out}", f"encoder={gpu_run}",
              f"data.shards={shards}", "finetune.methods=[pixels,scratch,knn,linear,finetune,semi]",
              "finetune.fractions=[0.1]", f"finetune.semi_method={semi_method}", "finetune.num_seeds=2",
              "finetune.epochs=2", "finetune.semi_epochs=1", "finetune.full_fraction_methods=[]",
              "trainer.use_gpu=true", workers, f"finetune.parallel={mode}"]))
    report = json.loads((out / "report.json").read_text())
    assert report["execution"] == mode and report["semi_method"] == semi_method
    assert (report["precision"], report["channels_last"]) == ("bf16", True)  # auto / null on a GPU
    # knn/linear's features: encoded on the GPU in the same formats, in the driver (local) or in Ray tasks
    assert report["encode"] == {"device": "cuda", "precision": "bf16", "channels_last": True,
                                "parts": report["encode"]["parts"]}
    assert (report["encode"]["parts"] == 0) == (mode == "local")
    assert {r["method"] for r in report["results"]} == {"pixels", "scratch", "knn", "linear", "finetune", "semi"}
    assert all(0.0 <= r["accuracy_mean"] <= 1.0 for r in report["results"])
    (model,) = list((out / "classifiers").iterdir())
    meta = json.loads((model / "model.json").read_text())
    assert meta["method"] == "semi" and meta["seed"] == 0

    # predict with the shipped classifier: the label the evaluation counted, for a few test images
    import csv

    from PIL import Image

    from shards.splits import load_split

    x, _, keys = load_split(str(shards), "test")
    with open(model / "predictions.csv") as f:
        counted = {r["key"]: r["predicted_name"] for r in csv.DictReader(f)}
    files = []
    for i in range(4):
        p = tmp_path / f"{keys[i]}.png"
        Image.fromarray(x[i, 0].numpy()).save(p)
        files.append(str(p))
    printed = _ok(_cli(["predict", str(model), *files])).strip().splitlines()
    agree = sum(line.split("\t")[1] == counted[k] for line, k in zip(printed, keys[:4]))
    assert len(printed) == 4 and agree >= 3  # predict runs on the CPU: a near-tie may fall the other way
    on_gpu = _ok(_cli(["predict", str(model), *files, "--device", "cuda", "--batch-size", "3"])).strip().splitlines()
    assert [ln.split("\t")[0] for ln in on_gpu] == files
    assert sum(a.split("\t")[1] == b.split("\t")[1] for a, b in zip(on_gpu, printed)) >= 3


@pytest.mark.parametrize("mode", ["local", "tasks"])
def test_select_and_inspect_encode_on_the_gpu(gpu_run, shards, tmp_path, mode):
    """`selfsup select` and `selfsup inspect` encode where fine-tuning would train: on the driver's GPU
    (local) or in Ray tasks holding a GPU each (tasks), in bf16 + channels_last, and pick the same images."""
    workers = {"local": "trainer.num_workers=0", "tasks": "trainer.num_workers=1"}[mode]
    common = ["--config", "configs/digits.yaml", f"encoder={gpu_run}", f"data.shards={shards}", "trainer.use_gpu=true",
              workers, f"finetune.parallel={mode}", "wandb.enabled=false"]
    out = tmp_path / "sel"
    _ok(_cli(["select", *common, f"output_dir={out}", "budget=20"]))
    record = json.loads((out / "subsets" / "selected-20-typiclust.json").read_text())
    assert {k: v for k, v in record["encode"].items() if k != "parts"} == {"device": "cuda", "precision": "bf16",
                                                                             "channels_last": True}
    assert (record["encode"]["parts"] == 0) == (mode == "local")
    assert len((out / "subsets" / "selected-20-typiclust.txt").read_text().split()) == 20
    _ok(_cli(["inspect", *common, f"output_dir={tmp_path / 'ins'}"]))
    report = json.loads((tmp_path / "ins" / "data_report.json").read_text())
    assert report["encode"]["device"] == "cuda" and (report["encode"]["parts"] == 0) == (mode == "local")


# ------------------------------------------------------------------ the benchmark's GPU sections


def test_bench_model_and_end_to_end_on_the_gpu(tmp_path):
    out = tmp_path / "bench.json"
    _ok(_cli(["bench", "--parts", "model,end_to_end", "--out", str(out), "--batch", "64", "--repeats", "2",
              "--images", "1024"]))
    r = json.loads(out.read_text())
    assert {"model", "end_to_end"} <= set(r)
    assert r["model"]["images_per_s"] > 0 and r["end_to_end"]["steps_per_s"] > 0
    assert 0 < r["end_to_end"]["pipeline_efficiency"] <= 1.5
