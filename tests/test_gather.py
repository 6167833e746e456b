"""NT-Xent with gathered negatives on 2 real Ray Train workers equals the one-process loss on the whole batch,
and so does a network with batch norm over the global batch on CPU workers (`model.sync_batchnorm`).

Gradients through a distributed all-gather are a classic source of silent bugs (a missing all-reduce in the
gather's backward, or a double average), so this checks losses AND gradients against one process:
- each worker holds half of a fixed global batch, projects it with a DDP-wrapped linear layer (the real
  `ray.train.torch.prepare_model`, gloo), and computes lightly's `NTXentLoss(gather_distributed=True)`;
- every row of the logits holds 1 positive and 2 * global_batch - 2 negatives, and the logits equal those
  recomputed from the whole batch in one process;
- mean of the ranks' losses == the one-process loss; DDP-synchronised weight gradients == the one-process
  gradients; each rank's input gradients / world_size == the one-process gradients of its samples.
"""

import socket
import sys

import pytest
import ray
import ray.cloudpickle
import torch
from lightly.loss import NTXentLoss
from torch import nn

GLOBAL_BATCH, IN_DIM, OUT_DIM, TEMPERATURE, SEED, WORLD = 8, 5, 6, 0.5, 0, 2


def fixed_batch():
    gen = torch.Generator().manual_seed(SEED)
    x0 = torch.randn(GLOBAL_BATCH, IN_DIM, generator=gen)
    x1 = torch.randn(GLOBAL_BATCH, IN_DIM, generator=gen)
    return x0, x1


def fixed_projection():
    torch.manual_seed(SEED + 1)
    return nn.Linear(IN_DIM, OUT_DIM)  # float32, as in training


def fixed_images():
    gen = torch.Generator().manual_seed(SEED + 2)
    return (torch.randn(GLOBAL_BATCH, 3, 6, 6, generator=gen) * 2 + 1,
            torch.randn(GLOBAL_BATCH, 3, 6, 6, generator=gen) * 2 + 1)


def bn_network():
    """conv -> BatchNorm2d -> pool -> linear -> BatchNorm1d, like a backbone and lightly's projection head."""
    torch.manual_seed(SEED + 3)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, OUT_DIM), nn.BatchNorm1d(OUT_DIM))


def worker_loop(config):
    """One Ray Train worker: its half of the batch, gathered loss, DDP backward; results to a file."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    assert dist.is_initialized() and dist.get_backend() == "gloo"
    b = GLOBAL_BATCH // world
    x0, x1 = fixed_batch()
    x0 = x0[rank * b:(rank + 1) * b].clone().requires_grad_(True)
    x1 = x1[rank * b:(rank + 1) * b].clone().requires_grad_(True)
    model = ray.train.torch.prepare_model(fixed_projection())
    assert isinstance(model, nn.parallel.DistributedDataParallel)

    loss_fn = NTXentLoss(temperature=TEMPERATURE, gather_distributed=True)
    seen = {}
    # observe the logits lightly builds (the real module's input), to count the negatives
    loss_fn.cross_entropy.register_forward_hook(
        lambda m, args, out: seen.update(logits=args[0].detach().clone(), labels=args[1].clone()))
    z0, z1 = model(torch.cat([x0, x1])).chunk(2)  # one forward per backward, as DDP expects
    loss = loss_fn(z0, z1)
    loss.backward()  # DDP all-reduces (means) the weight gradients across the 2 ranks here

    lin = model.module
    torch.save({"loss": loss.detach(), "logits": seen["logits"], "labels": seen["labels"],
                "x0_grad": x0.grad, "x1_grad": x1.grad, "w_grad": lin.weight.grad, "b_grad": lin.bias.grad,
                "world": torch.tensor(world)}, f"{config['out']}/rank{rank}.pt")

    # the same with a conv + batch-norm network, as pretraining converts it for CPU workers; and the plain
    # per-worker batch norm beside it, which must differ (else the comparison proves nothing)
    from pretrain.model import CPUSyncBatchNorm, convert_sync_batchnorm

    i0, i1 = (x[rank * b:(rank + 1) * b] for x in fixed_images())
    results = {}
    for kind in ("global", "local"):
        net = bn_network()
        if kind == "global":
            net = convert_sync_batchnorm(net, True, "cpu")
            assert sum(isinstance(m, CPUSyncBatchNorm) for m in net.modules()) == 2
        net = ray.train.torch.prepare_model(net)
        z0, z1 = net(torch.cat([i0, i1])).chunk(2)
        loss = NTXentLoss(temperature=TEMPERATURE, gather_distributed=True)(z0, z1)
        loss.backward()
        results[kind] = {"loss": loss.detach(), "z": torch.cat([z0, z1]).detach(),
                         "grads": {k: p.grad.clone() for k, p in net.module.named_parameters()},
                         "buffers": {k: v.clone() for k, v in net.module.named_buffers()}}
    torch.save(results, f"{config['out']}/bn-rank{rank}.pt")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_port=free_port(),
             dashboard_host="127.0.0.1", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def two_worker_run(tmp_path_factory, ray_cluster):
    """One Ray Train run of `worker_loop` on 2 gloo workers; its directory of per-rank result files."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    out = tmp_path_factory.mktemp("gather")
    # the test module is not importable inside the workers: ship worker_loop by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"out": str(out)},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=WORLD, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="gather", storage_path=str(out / "ray")),
    )
    trainer.fit()
    return out


@pytest.mark.slow
def test_gathered_ntxent_matches_single_process(two_worker_run):
    ranks = [torch.load(two_worker_run / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert all(int(r["world"]) == WORLD for r in ranks)

    # the same computation in one process, no gather
    x0, x1 = (x.clone().requires_grad_(True) for x in fixed_batch())
    lin = fixed_projection()
    z0, z1 = lin(torch.cat([x0, x1])).chunk(2)
    single = NTXentLoss(temperature=TEMPERATURE)(z0, z1)
    single.backward()

    # 1. every sample meets 2 * global_batch - 2 negatives: the logits are the global ones
    b = GLOBAL_BATCH // WORLD
    n0, n1 = nn.functional.normalize(z0.detach(), dim=1), nn.functional.normalize(z1.detach(), dim=1)
    off_diag = ~torch.eye(GLOBAL_BATCH, dtype=torch.bool)
    for rank, r in enumerate(ranks):
        logits = r["logits"]
        assert logits.shape == (2 * b, 2 * GLOBAL_BATCH - 1)  # 1 positive + (2 * 8 - 2) negatives per row
        rows = slice(rank * b, (rank + 1) * b)
        expected_v0 = torch.cat([n0[rows] @ n1.T, (n0 @ n0.T)[off_diag].view(GLOBAL_BATCH, -1)[rows]], 1)
        expected_v1 = torch.cat([n1[rows] @ n0.T, (n1 @ n1.T)[off_diag].view(GLOBAL_BATCH, -1)[rows]], 1)
        expected = torch.cat([expected_v0, expected_v1]) / TEMPERATURE
        assert torch.allclose(logits, expected, atol=1e-5)
        # the positive of local sample i is global sample rank * b + i in the other view's columns
        assert r["labels"].tolist() == [rank * b + i for i in range(b)] * 2

    # 2. the mean of the ranks' losses is the one-process loss
    mean_loss = torch.stack([r["loss"] for r in ranks]).mean()
    assert abs(float(mean_loss) - float(single.detach())) < 1e-5

    # 3. DDP-synchronised weight gradients: the same on both ranks, and equal to one process
    for r in ranks:
        assert torch.allclose(r["w_grad"], lin.weight.grad, atol=1e-5, rtol=0)
        assert torch.allclose(r["b_grad"], lin.bias.grad, atol=1e-5, rtol=0)
    assert lin.weight.grad.abs().max() > 1e-3  # the comparison is not between zeros

    # 4. the input gradients: the gather's backward sums every rank's contribution (all-reduce), so each
    # rank holds world_size times its share of d(mean loss)/d(its samples) -- DDP's mean divides by it
    for rank, r in enumerate(ranks):
        rows = slice(rank * b, (rank + 1) * b)
        assert torch.allclose(r["x0_grad"] / WORLD, x0.grad[rows], atol=1e-5, rtol=0)
        assert torch.allclose(r["x1_grad"] / WORLD, x1.grad[rows], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_cpu_sync_batchnorm_on_two_workers_matches_one_process_on_the_whole_batch(two_worker_run):
    ranks = [torch.load(two_worker_run / f"bn-rank{r}.pt", weights_only=True) for r in range(WORLD)]

    # one process, plain batch norm, the whole batch (each view's samples in rank order)
    i0, i1 = (x.clone() for x in fixed_images())
    net = bn_network()
    z0, z1 = net(torch.cat([i0, i1])).chunk(2)
    single = NTXentLoss(temperature=TEMPERATURE)(z0, z1)
    single.backward()
    b = GLOBAL_BATCH // WORLD
    grads = {k: p.grad for k, p in net.named_parameters()}
    buffers = dict(net.named_buffers())

    for rank, r in enumerate(ranks):
        g = r["global"]
        # outputs: rank r's rows of each view, normalised with the whole batch's statistics
        rows = slice(rank * b, (rank + 1) * b)
        assert torch.allclose(g["z"], torch.cat([z0[rows], z1[rows]]).detach(), atol=1e-5)
        # per-worker statistics give other outputs: the check above is not vacuous
        assert not torch.allclose(r["local"]["z"], g["z"], atol=1e-3)
        # DDP's mean of the ranks' gradients (every parameter, batch-norm weights included) == one process
        assert set(g["grads"]) == set(grads)
        for k, grad in grads.items():
            assert torch.allclose(g["grads"][k], grad, atol=1e-5, rtol=1e-4), k
        # running statistics: the whole batch's, the same on every rank (unbiased variance, as BatchNorm)
        for k in ("1.running_mean", "1.running_var", "6.running_mean", "6.running_var", "6.num_batches_tracked"):
            assert torch.allclose(g["buffers"][k].float(), buffers[k].float(), atol=1e-5), k
    assert abs(float(torch.stack([r["global"]["loss"] for r in ranks]).mean()) - float(single.detach())) < 1e-5
    assert max(gr.abs().max() for gr in grads.values()) > 1e-3  # not a comparison of zeros


def test_cpu_sync_batchnorm_is_plain_batchnorm_in_one_process_and_in_eval():
    from pretrain.model import CPUSyncBatchNorm

    torch.manual_seed(0)
    plain = bn_network()
    synced = CPUSyncBatchNorm.convert(bn_network())
    assert sum(isinstance(m, CPUSyncBatchNorm) for m in synced.modules()) == 2
    assert synced.state_dict().keys() == plain.state_dict().keys()  # the export loads into plain timm models
    x = torch.randn(8, 3, 6, 6)
    for mode in (True, False):
        plain.train(mode)
        synced.train(mode)
        assert torch.allclose(plain(x), synced(x), atol=1e-6)
    plain.load_state_dict(synced.state_dict(), strict=True)
