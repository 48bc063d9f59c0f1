"""Data-parallel training (``attnkit.distributed.data_parallel``) on 2 spawned gloo processes.

For every model of the project, the project's own training loop runs a few steps under
``DistributedDataParallel`` with the global batch split over 2 ranks, and the resulting
parameters (and reported losses) must equal those of one process training on the whole batch.
Shards are deliberately uneven where the loop allows it (an odd last batch, an odd number of
training nodes / predators / instances) to check the exact loss rescaling. One more test
launches the ``attnkit`` command under ``torchrun`` (``python -m torch.distributed.run``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from attnkit.distributed import data_parallel as D
from attnkit.results import RunContext

WORLD = 2
TIMEOUT_S = 30.0  # per collective: a broken case fails instead of hanging
TOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ctx(tmp: str = "/tmp") -> RunContext:
    ctx = RunContext(quick=True, out_dir=Path(tmp))
    ctx.progress = lambda it, desc="", total=None: iter(it)  # no progress bars in workers
    return ctx


# ------------------------------------------------------------------- one training run per model
# Each case builds its model and data from fixed seeds, runs the project's training loop and
# returns {"state": parameters, "losses": [...]}. Called once per rank under DDP and once in the
# test process without a process group.


def _result(model: torch.nn.Module, losses) -> dict:
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "losses": [float(x) for x in losses]}


def case_decoder_lm() -> dict:
    from attnkit.decoding import train_lm
    from attnkit.models import DecoderLM

    torch.manual_seed(0)
    model = DecoderLM(11, 16, 2, num_heads=4, num_kv_heads=2, max_seq_len=32)
    data = torch.randint(0, 11, (200,), generator=torch.Generator().manual_seed(1))
    losses = train_lm(model, data, 3, batch_size=4, seq_len=12, warmup=1, seed=2)
    return _result(model, losses)


def _genome_model():
    from attnkit.genome.model import GenomeEncoder, GenomePattern

    torch.manual_seed(0)
    return GenomeEncoder(16, 1, 2, GenomePattern(window=8, exponential=True, hubs=2),
                         num_labels=3, stem_kernel=3).double()  # fp64: see _fusion


def _genome_sample(batch: int, gen: torch.Generator):
    from attnkit.genome.synthetic import IGNORE_INDEX

    tokens = torch.randint(0, 4, (batch, 48), generator=gen)
    labels = torch.randint(0, 3, (batch, 48), generator=gen)
    # uneven numbers of labeled positions per sample: the loss is a mean over labeled ones
    drop = torch.rand(batch, 48, generator=gen) < torch.linspace(0.1, 0.9, batch)[:, None]
    return tokens, labels.masked_fill(drop, IGNORE_INDEX)


def case_genome_labels() -> dict:
    from attnkit.genome.train import train_labels

    model = _genome_model()
    losses = train_labels(model, _genome_sample, steps=3, batch_size=5, lr=3e-3, seed=3)
    return _result(model, losses)


def case_genome_mlm() -> dict:
    from attnkit.genome.train import train_mlm

    model = _genome_model()
    tokens = torch.randint(0, 4, (400,), generator=torch.Generator().manual_seed(4))
    losses = train_mlm(model, tokens, steps=3, window_len=64, batch_size=2, seed=5)
    return _result(model, losses)


def case_vit() -> dict:
    from attnkit.vision.experiment import train_vit

    gen = torch.Generator().manual_seed(6)
    x = torch.rand(11, 1, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (11,), generator=gen)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # fp64 (see _fusion): train_vit builds the model
    try:
        model = train_vit(_ctx(), "pre", x, y, epochs=1, seed=0, batch_size=4)  # 4, 4, 3 (2+1)
    finally:
        torch.set_default_dtype(before)
    return _result(model, [])


def case_axial_volume() -> dict:
    from attnkit.volume.experiment import train_segmenter

    model = train_segmenter(_ctx(), side=8, n_train=4, steps=2, seed=0)  # class-weighted CE
    return _result(model, [])


def _graph(multilabel: bool):
    from attnkit.graphs.loaders import GraphData

    gen = torch.Generator().manual_seed(7)
    n = 14
    edges = torch.randint(0, n, (2, 40), generator=gen)
    y = (torch.rand(n, 3, generator=gen) < 0.4).float() if multilabel else \
        torch.randint(0, 3, (n,), generator=gen)
    train = torch.zeros(n, dtype=torch.bool)
    train[[0, 2, 3, 5, 8, 9, 11]] = True  # 7 training nodes: 4 + 3
    val = ~train
    return GraphData(x=torch.randn(n, 5, generator=gen), edge_index=edges, y=y,
                     train_mask=train, val_mask=val, test_mask=val)


def case_gat() -> dict:
    from attnkit.graphs.models import GAT, fit

    torch.manual_seed(0)
    data = _graph(multilabel=False)
    model = GAT(5, 4, 3, heads=2, dropout=0.3)  # same dropout masks on every rank: exact
    fit(model, data, epochs=3, lr=0.01, patience=100)
    return _result(model, [])


def case_mean_aggregation() -> dict:
    from attnkit.graphs.models import MeanAggregation, fit

    torch.manual_seed(0)
    data = _graph(multilabel=True)
    model = MeanAggregation(5, 4, 3, heads=2, dropout=0.0, multilabel=True)
    fit(model, data, epochs=3, lr=0.01, patience=100)
    return _result(model, [])


def case_trophic_attention() -> dict:
    from attnkit.ecology.linkpred import FitConfig, fit_trophic_attention

    rng = np.random.default_rng(8)
    s = 7  # 7 predators: 4 + 3
    flows = rng.random((s, s)) * (rng.random((s, s)) < 0.5)
    levels = 1.0 + rng.random(s) * 2
    model = fit_trophic_attention(flows, levels, "trophic", FitConfig(dim=4, steps=3))
    return _result(model, [])


def _fusion(cls, **kw) -> dict:
    from attnkit.multimodal.data import SpokenDigitTask, synthetic_recordings
    from attnkit.multimodal.training import train_model

    task = SpokenDigitTask(synthetic_recordings(num_speakers=2, per_digit=2, seed=0),
                           n_digits=2, audio_len=24)
    torch.manual_seed(0)
    # fp64: a key bias has an exactly zero gradient (softmax ignores it), which Adam would turn
    # from fp32 rounding noise into +-lr steps; in fp64 the noise stays far below Adam's eps
    model = cls(dim=8, hidden=8, max_audio_len=64, **kw).double()
    losses = train_model(model, _Float64Task(task), steps=3, batch_size=5, seed=9)
    return _result(model, losses)


class _Float64Task:
    def __init__(self, task):
        self.task = task

    def sample(self, batch: int, rng: np.random.Generator) -> dict:
        return {k: v.astype(np.float64) if v.dtype == np.float32 else v
                for k, v in self.task.sample(batch, rng).items()}


def case_cross_fusion() -> dict:
    from attnkit.multimodal.models import CrossModalFusion

    return _fusion(CrossModalFusion, heads=2)


def case_early_fusion() -> dict:
    from attnkit.multimodal.models import EarlyFusion

    return _fusion(EarlyFusion, heads=2)


def case_late_fusion() -> dict:
    from attnkit.multimodal.models import LateFusion

    return _fusion(LateFusion)


def case_knapsack() -> dict:
    from attnkit.knapsack.attention import AttentionKnapsack
    from attnkit.knapsack.instances import generate

    instances = [generate(12, kind, R=100, seed=s)  # 3 instances: 2 + 1
                 for s, kind in enumerate(("uncorrelated", "weakly_correlated", "subset_sum"))]
    model = AttentionKnapsack(bisection_steps=12)
    losses = model.fit(instances, steps=3, lr=0.05, seed=0)
    return _result(model, losses)


CASES: dict[str, Callable[[], dict]] = {
    name[len("case_"):]: fn for name, fn in sorted(globals().items())
    if name.startswith("case_") and callable(fn)
}


# ------------------------------------------------------------------------- spawned workers


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    assert D.init_from_env(timeout_s=TIMEOUT_S)
    try:
        results = {"world": D.world_size(), "rank": D.rank(), "main": D.is_main_process(),
                   "helpers": _helpers_under_ddp()}
        for name, fn in CASES.items():
            try:
                results[name] = fn()
            except Exception:
                results[name] = {"error": traceback.format_exc()}
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        D.shutdown()


def _helpers_under_ddp() -> dict:
    """The collective helpers' answers on this rank (checked in the test process)."""
    mask = torch.tensor([True, False, True, True, False, True, True])
    # rank 1 has no item: its local mean is NaN (0/0) and it must contribute exactly zero
    w = torch.nn.Parameter(torch.tensor(2.0))
    local = (w * torch.full((4 if D.rank() == 0 else 0,), 3.0)).mean()
    scaled = D.rescale_mean(local, 4 if D.rank() == 0 else 0)
    scaled.backward()
    try:
        D.run_on_main(lambda: 1 / 0)
        shared_error = ""
    except (ZeroDivisionError, RuntimeError) as e:
        shared_error = type(e).__name__
    return {
        "on_main": D.run_on_main(lambda: ("from rank", D.rank())),
        "mean_rank": D.all_reduce_mean(float(D.rank())),
        "mean_tensor": D.all_reduce_mean(torch.tensor([1.0, 2.0]) * (D.rank() + 1)),
        "mask": D.shard_mask(mask),
        "shard": D.shard(torch.arange(5)),
        "list": D.shard(["a", "b", "c"]),
        "scaled": float(scaled.detach()), "grad": float(w.grad),
        "global_mean": float(D.all_reduce_mean(scaled.detach())),
        "shared_error": shared_error,
    }


def _spawn(fn: Callable, args: tuple, timeout: float) -> None:
    """``torch.multiprocessing`` spawn of ``WORLD`` processes with an overall time limit."""
    ctx = mp.start_processes(fn, args=args, nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"spawned workers did not finish within {timeout} s")


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    _spawn(_worker, (_free_port(), str(out)), timeout=150)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_workers_see_the_process_group(ddp_results):
    assert [r["world"] for r in ddp_results] == [WORLD] * WORLD
    assert [r["rank"] for r in ddp_results] == list(range(WORLD))
    assert [r["main"] for r in ddp_results] == [True] + [False] * (WORLD - 1)


def test_collective_helpers(ddp_results):
    h = [r["helpers"] for r in ddp_results]
    assert [x["on_main"] for x in h] == [("from rank", 0)] * WORLD
    assert [x["mean_rank"] for x in h] == [0.5, 0.5]
    for x in h:
        torch.testing.assert_close(x["mean_tensor"], torch.tensor([1.5, 3.0]))
    masks = [x["mask"] for x in h]
    assert masks[0].tolist() == [True, False, True, True, False, False, False]
    assert masks[1].tolist() == [False, False, False, False, False, True, True]
    assert [x["shard"].tolist() for x in h] == [[0, 1, 2], [3, 4]]
    assert [x["list"] for x in h] == [["a", "b", "c"][:2], ["c"]]
    # rank 0: mean 6 over 4 of the 4 items -> scaled 6 * 4 * 2 / 4; rank 1: exactly 0
    assert [x["scaled"] for x in h] == [12.0, 0.0]
    assert [x["grad"] for x in h] == [6.0, 0.0]  # local; DDP averages them to 3 = d(3w)/dw
    assert [x["global_mean"] for x in h] == [6.0, 6.0]
    assert [x["shared_error"] for x in h] == ["ZeroDivisionError", "RuntimeError"]


@pytest.mark.parametrize("name", list(CASES))
def test_ddp_training_equals_one_process_on_the_whole_batch(ddp_results, name):
    got = [r[name] for r in ddp_results]
    for r, g in enumerate(got):
        assert "error" not in g, f"rank {r} raised:\n{g.get('error')}"
    ref = CASES[name]()  # no process group here: the unchanged single-process loop
    ranks_state = [g["state"] for g in got]
    assert set(ranks_state[0]) == set(ref["state"])
    init = _initial_state(name)
    moved = 0.0
    for key, want in ref["state"].items():
        for r, state in enumerate(ranks_state):
            torch.testing.assert_close(state[key], want, atol=TOL, rtol=TOL,
                                       msg=lambda m, k=key, r=r: f"{name} rank {r} {k}: {m}")
        if init is not None and want.is_floating_point():
            moved = max(moved, float((want - init[key]).abs().max()))
    if init is not None:
        assert moved > 1e-3, f"{name}: training did not change the parameters"
    # every rank reports the global batch's loss, equal to the single-process one
    for g in got:
        np.testing.assert_allclose(g["losses"], ref["losses"], rtol=TOL, atol=TOL)


def _initial_state(name: str) -> dict | None:
    """Parameters before training (for the cases whose model is built before the loop)."""
    builders = {"genome_labels": _genome_model, "genome_mlm": _genome_model}
    if name not in builders:
        return None
    return {k: v.clone() for k, v in builders[name]().state_dict().items()}


# ------------------------------------------------------------------ without a process group


def test_helpers_are_the_identity_without_torchrun(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert D.init_from_env() is False
    assert not dist.is_initialized()
    assert not D.is_distributed()
    assert (D.rank(), D.world_size(), D.is_main_process()) == (0, 1, True)
    model = torch.nn.Linear(3, 2)
    assert D.wrap_ddp(model) is model
    x = torch.randn(5, 3)
    assert D.shard(x) is x
    mask = torch.tensor([True, False, True])
    assert D.shard_mask(mask) is mask
    loss = model(x).mean()
    assert D.rescale_mean(loss, 5) is loss
    assert D.all_reduce_mean(loss) is loss and D.all_reduce_mean(2.5) == 2.5
    assert D.shard_slice(7) == slice(0, 7)
    assert D.run_on_main(lambda a, b: a + b, 2, b=3) == 5
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert D.init_from_env() is False and not dist.is_initialized()


def test_init_from_env_names_missing_variables(monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="LOCAL_RANK, MASTER_ADDR, MASTER_PORT"):
        D.init_from_env()
    for var, val in (("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1")):
        monkeypatch.setenv(var, val)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK < WORLD_SIZE"):
        D.init_from_env()
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="timeout_s"):
        D.init_from_env(timeout_s=0)
    with pytest.raises(ValueError, match="backend"):
        D.init_from_env(backend="mpi-over-carrier-pigeon")
    assert not dist.is_initialized()


@pytest.mark.parametrize("n", [0, 2, 5, 7, 16])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_shard_range_partitions_contiguously(n, world):
    if 0 < n < world:
        with pytest.raises(ValueError, match=f"cannot split {n} item"):
            D.shard_range(n, 0, world)
        return
    parts = [D.shard_range(n, r, world) for r in range(world)]
    assert [i for p in parts for i in p] == list(range(n))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="rank"):
        D.shard_range(4, 2, 2)
    with pytest.raises(ValueError, match="world"):
        D.shard_range(4, 0, 0)
    with pytest.raises(ValueError, match="n must be"):
        D.shard_range(-1, 0, 1)
    with pytest.raises(TypeError, match="model"):
        D.wrap_ddp("not a module")
    with pytest.raises(TypeError, match="mask"):
        D.shard_mask(torch.ones(3))
    with pytest.raises(TypeError, match="extra"):
        D.ApplyModule(torch.nn.Linear(2, 2), extra={"g": torch.zeros(())})
    with pytest.raises(TypeError, match="loss"):
        D.rescale_mean(1.0, 3)


def test_apply_module_runs_the_function_and_registers_extras():
    lin = torch.nn.Linear(3, 2)
    gain = torch.nn.Parameter(torch.ones(()))
    net = D.ApplyModule(lin, extra={"gain": gain})
    x = torch.randn(4, 3)
    torch.testing.assert_close(net(lambda m, z: m(z) * gain, x), lin(x) * gain)
    assert {id(p) for p in net.parameters()} == {id(p) for p in lin.parameters()} | {id(gain)}
    assert D.unwrap(net) is lin


# ---------------------------------------------------------------- the command under torchrun

_TINY_LM = textwrap.dedent("""
    import torch
    from attnkit.decoding import train_lm
    from attnkit.models import DecoderLM

    def tiny_lm():
        torch.manual_seed(0)
        model = DecoderLM(11, 16, 1, num_heads=2, max_seq_len=32)
        data = torch.randint(0, 11, (200,), generator=torch.Generator().manual_seed(1))
        losses = train_lm(model, data, 3, batch_size=4, seq_len=12, warmup=1)
        return losses[-1], float(model.head.weight.detach().double().sum())
""")

_LAUNCHED = _TINY_LM + textwrap.dedent("""
    import sys
    from attnkit import cli
    from attnkit.distributed import data_parallel as D
    from attnkit.results import Experiment, Result

    def run(ctx):
        loss, head = tiny_lm()
        print("chatter from rank", D.rank())  # an experiment's stdout goes to stderr
        path = ctx.figure_path(f"rank{D.rank()}.txt")
        path.write_text("x")
        return Result(metrics={"world": D.world_size(), "loss": loss, "head": head},
                      held=True, figures=[str(path)])

    exp = Experiment("tinylm", "a tiny data-parallel LM trains", run)
    cli.collect_experiments = lambda: ({"tinylm": exp}, [])
    sys.exit(cli.main())
""")


def test_cli_under_torchrun_trains_on_both_ranks_and_only_rank0_writes(tmp_path):
    """``python -m torch.distributed.run --nproc-per-node 2 SCRIPT run tinylm --json``: one
    JSON line (rank 0), rank 0's file only, and the single-process model's numbers."""
    script = tmp_path / "launched.py"
    script.write_text(_LAUNCHED)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={WORLD}",
           "--master-addr=127.0.0.1", f"--master-port={_free_port()}", str(script),
           "run", "tinylm", "--json", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, f"only rank 0 prints, got:\n{proc.stdout}"
    obj = json.loads(lines[0])
    assert obj["metrics"]["world"] == WORLD and obj["verdict"] == "held"
    assert sorted(p.name for p in out.iterdir()) == ["rank0.txt", "result.json"]
    assert "chatter from rank 0" in proc.stderr  # rank 0 logs; the other ranks stay silent
    assert "chatter from rank 1" not in proc.stderr
    scope: dict = {}
    exec(_TINY_LM, scope)  # the same training in this process, without a process group
    loss, head = scope["tiny_lm"]()
    assert obj["metrics"]["loss"] == pytest.approx(loss, rel=1e-5, abs=1e-5)
    assert obj["metrics"]["head"] == pytest.approx(head, rel=1e-5, abs=1e-5)
