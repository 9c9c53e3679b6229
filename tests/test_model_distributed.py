"""Distributed training on CPU with the gloo backend, two processes launched by the test itself.

- DDP: a two-process step gives the same LoRA gradients as one process on the whole batch.
- FSDP2 (fully_shard): frozen base + trainable LoRA parameters shard and train one step,
  matching the single-process step.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import lora_ext

WORLD = 2
BATCH = 8

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard  # torch >= 2.6
    except ImportError:
        from torch.distributed._composable.fsdp import fully_shard  # torch 2.5
    return fully_shard


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 32)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(40, 32)
        self.blocks = nn.ModuleList([_Block() for _ in range(2)])
        self.head = nn.Linear(32, 40)

    def forward(self, ids):
        x = self.emb(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = _Net()
    torch.manual_seed(1)
    cfg = lora_ext.LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down", "emb"], init_lora_weights=False)
    return lora_ext.inject_adapter(model, cfg)


def _data():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 40, (BATCH, 5), generator=g)
    labels = torch.randint(0, 40, (BATCH, 5), generator=g)
    return ids, labels


def _loss(model, ids, labels):
    logits = model(ids)
    return nn.functional.cross_entropy(logits.reshape(-1, 40), labels.reshape(-1))


def _single_process_reference() -> tuple[dict, dict]:
    model = _model()
    ids, labels = _data()
    _loss(model, ids, labels).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    opt.step()
    after = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return grads, after


def _step(rank: int, mode: str) -> dict:
    model = _model()
    ids, labels = _data()
    shard = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if mode == "ddp":
        wrapped = nn.parallel.DistributedDataParallel(model)
        _loss(wrapped, ids[shard], labels[shard]).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        opt.step()
        after = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    else:
        fully_shard = _fully_shard()
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        frozen = [p for p in model.parameters() if not p.requires_grad]
        assert frozen and all(type(p).__name__ == "DTensor" for p in frozen), "frozen base params are sharded too"
        _loss(model, ids[shard], labels[shard]).backward()
        # FSDP reduce-scatters the mean of the ranks' gradients, like DDP
        grads = {n: p.grad.full_tensor().clone() for n, p in model.named_parameters() if p.requires_grad}
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        opt.step()
        after = {n: p.detach().full_tensor().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(grads) == sorted(names)
    return {"grads": grads, "after": after}


def _worker(rank: int, modes: list, init_file: str, out_file: str) -> None:
    # a fatal signal in a worker (an abort inside gloo, say) prints every thread's C++ stack
    if hasattr(torch._C, "_set_print_stack_traces_on_fatal_signal"):
        torch._C._set_print_stack_traces_on_fatal_signal(True)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    results = {}
    try:
        for mode in modes:
            try:
                results[mode] = _step(rank, mode)
            except Exception as e:  # reported to the test, which fails with the message
                results[mode] = {"error": f"{type(e).__name__}: {e}"}
            dist.barrier()
        if rank == 0:
            torch.save(results, out_file)
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's finalization: a gloo worker thread that drops its last
    # finished work (tensors with Python objects) while the main thread finalizes takes the
    # GIL, is ended by pthread_exit and aborts the process ("terminate called without an active
    # exception" from c10d::ProcessGroupGloo::runLoop; seen in about 1 run in 40 here, the stack
    # printed by the handler above). The results are saved and the group destroyed by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory) -> dict:
    """Launch the two gloo processes once for all modes (process start-up dominates the run time)."""
    tmp = tmp_path_factory.mktemp("dist")
    modes = ["ddp"]
    try:
        _fully_shard()
        modes.append("fsdp2")
    except ImportError:
        pass
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(modes, str(tmp / "init"), str(tmp / "out.pt")), nprocs=WORLD, join=True)
    return torch.load(str(tmp / "out.pt"))


def _compare(got: dict, ref: dict) -> None:
    assert sorted(got) == sorted(ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def _check(result: dict) -> None:
    assert "error" not in result, result.get("error")
    ref_grads, ref_after = _single_process_reference()
    _compare(result["grads"], ref_grads)
    _compare(result["after"], ref_after)
    assert ref_grads and all(".lora_" in k for k in ref_grads)


def test_ddp_two_processes_same_lora_grads_as_one(dist_results):
    _check(dist_results["ddp"])


def test_fsdp2_fully_shard_trains_one_step(dist_results):
    if "fsdp2" not in dist_results:
        pytest.skip("this torch has no FSDP2 fully_shard")
    _check(dist_results["fsdp2"])
