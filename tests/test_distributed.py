import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from toy_agent import ToyAgent, sample_batch

from diffrl import distributed as D
from diffrl.training import Learner, TrainConfig, Trainer

WORLD = 2
STEPS = 6
LEARNER_ARGS = {"lr": 1e-2, "max_grad_norm": 0.5, "ema_decay": 0.9}


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 32), nn.Tanh(), nn.Linear(32, 2))


def _micro_batch_loss(net: nn.Module, step: int, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(16, 3, generator=g)
    y = torch.stack([x[:, 0] * x[:, 1], x[:, 2] + rank], dim=1)  # ranks see different data
    return ((net(x) - y) ** 2).mean()


def _trainer_run(run_dir: Path, steps: int, agent_seed: int, resume: bool) -> ToyAgent:
    agent = ToyAgent(seed=agent_seed)
    config = TrainConfig(steps=steps, batch_size=8, log_every=3, checkpoint_every=4, progress=False,
                         run_dir=str(run_dir))
    history = Trainer(agent, sample_batch, config).fit(resume=resume)
    assert (len(history) > 0) == D.is_main_process()
    return agent


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    # a file rendezvous: no port to find free (the torchrun test in test_cli.py covers the env:// path)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    assert D.init_distributed() == torch.device("cpu")  # joins the group that is up
    try:
        assert (D.rank(), D.world_size(), D.is_main_process()) == (rank, WORLD, rank == 0)
        assert D.all_reduce_mean(torch.tensor([float(rank)])).item() == 0.5
        assert D.all_gather_object(rank * 10) == [0, 10]
        # ranks start from different weights: the Learner adopts rank 0's initialisation
        net = _mlp(seed=rank)
        learner = Learner(net, **LEARNER_ARGS)
        for step in range(STEPS):
            learner.step(_micro_batch_loss(net, step, rank))
        # a two-process Trainer run stopped at step 8 and resumed must equal an uninterrupted one
        out = Path(out_dir)
        full = _trainer_run(out / "full", steps=12, agent_seed=0, resume=False)
        _trainer_run(out / "split", steps=8, agent_seed=0, resume=False)
        resumed = _trainer_run(out / "split", steps=12, agent_seed=5, resume=True)
        torch.save({"params": [p.detach() for p in net.parameters()],
                    "ema": list(learner.ema_module.parameters()),
                    "resume_exact": all(torch.equal(a, b) for a, b in zip(full.tensors(), resumed.tensors(),
                                                                          strict=True))},
                   out / f"rank{rank}.pt")
    finally:
        D.cleanup()


@pytest.mark.slow
def test_two_processes_match_single_process_gradient_accumulation(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    net = _mlp(seed=0)
    learner = Learner(net, **LEARNER_ARGS)
    for step in range(STEPS):
        learner.step(sum(_micro_batch_loss(net, step, r) for r in range(WORLD)) / WORLD)
    expected = [p.detach() for p in net.parameters()]
    expected_ema = list(learner.ema_module.parameters())

    assert _max_diff(expected, _mlp(seed=0).parameters()) > 1e-2  # training moved the weights
    for r, result in enumerate(ranks):
        assert _max_diff(result["params"], expected) < 1e-5, f"rank {r}"
        assert _max_diff(result["ema"], expected_ema) < 1e-5, f"rank {r}"
        assert result["resume_exact"], f"rank {r}: resumed distributed run differs"
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["params"], ranks[1]["params"], strict=True))
    ckpt = tmp_path / "split" / "checkpoints"
    expected_files = ["latest.pt", "step_0000004.pt", "step_0000008.pt", "step_0000012.pt"]
    assert sorted(p.name for p in ckpt.iterdir()) == expected_files


def _max_diff(a, b) -> float:
    return max((p.detach() - q.detach()).abs().max().item() for p, q in zip(a, b, strict=True))


def test_single_process_defaults(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert D.init_distributed() == torch.device("cpu")
    assert not D.is_initialized()
    assert (D.rank(), D.world_size(), D.is_main_process()) == (0, 1, True)
    t = torch.tensor([3.0])
    assert D.all_reduce_mean(t) is t and t.item() == 3.0
    assert D.all_gather_object("x") == ["x"]
    D.barrier()
    D.cleanup()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="MASTER_ADDR.*launch with torchrun"):
        D.init_distributed()


def _threads_and_square(x: int) -> tuple[int, int, int]:
    return torch.get_num_threads(), os.getpid(), x * x


def test_parallel_map_spawns_single_threaded_workers():
    results = D.parallel_map(_threads_and_square, range(6), processes=2)
    assert [r[2] for r in results] == [x * x for x in range(6)]
    assert {r[0] for r in results} == {1}
    workers = {r[1] for r in results}
    # Work runs in the pool's processes (how the items spread over the two workers depends on start-up timing).
    assert os.getpid() not in workers and 1 <= len(workers) <= 2
    inline = D.parallel_map(_threads_and_square, [3], processes=4)
    assert inline == [(torch.get_num_threads(), os.getpid(), 9)]
