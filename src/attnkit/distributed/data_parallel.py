"""Data-parallel training on ``torch.distributed``: the small helpers every training loop uses.

Under ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``), :func:`init_from_env` joins the process group (gloo on CPU, NCCL with CUDA,
with a timeout on every collective so a lost rank raises instead of hanging). A training loop
then

- wraps its model with :func:`wrap_ddp` (``DistributedDataParallel``, which averages the
  gradients over ranks during ``backward``),
- draws the same global batch on every rank (same seed) and keeps its own part of it with
  :func:`shard` / :func:`shard_slice` / :func:`shard_mask`,
- turns its local mean loss into one whose rank-averaged gradient is the gradient of the mean
  over the *whole* batch with :func:`rescale_mean` (exact even when the shards hold different
  numbers of items, e.g. masked tokens), and
- reports :func:`all_reduce_mean` of the rescaled loss, which is the global batch's mean loss.

Without a process group (a plain ``python`` run, or ``WORLD_SIZE`` unset or 1) every helper is
the identity: :func:`wrap_ddp` returns the model itself, :func:`shard` the whole batch,
:func:`rescale_mean` the loss itself, so single-process training is unchanged.

So that ``DistributedDataParallel`` sees a whole training computation that is more than one
``forward`` call (e.g. ``model.mlm_logits(model(x))``, or a loss over several instances),
:class:`ApplyModule` runs ``fn(module, *args)`` as its forward.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..checks import check_positive_int

__all__ = [
    "init_from_env",
    "shutdown",
    "is_distributed",
    "rank",
    "world_size",
    "local_rank",
    "is_main_process",
    "wrap_ddp",
    "unwrap",
    "ApplyModule",
    "shard_range",
    "shard_slice",
    "shard",
    "shard_mask",
    "rescale_mean",
    "all_reduce_mean",
    "run_on_main",
]

T = TypeVar("T")

#: Default seconds a collective may wait before raising (``ATTNKIT_DIST_TIMEOUT`` overrides).
DEFAULT_TIMEOUT_S = 600.0
_ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _env_int(name: str) -> int:
    raw = os.environ.get(name, "")
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


def init_from_env(backend: str | None = None, timeout_s: float | None = None) -> bool:
    """Join the process group described by torchrun's environment variables.

    Args:
        backend: ``"gloo"`` or ``"nccl"``; default NCCL when CUDA is available, else gloo.
        timeout_s: seconds any collective may wait before it raises (default
            ``ATTNKIT_DIST_TIMEOUT`` from the environment, else 600): a rank that died or
            diverged makes the others fail instead of hanging.

    Returns:
        ``True`` when running distributed (process group initialized, now or before), ``False``
        when ``WORLD_SIZE`` is unset or 1 (nothing is done).

    Raises:
        ValueError: a required variable (``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``,
            ``MASTER_PORT``) is missing or malformed, or ``timeout_s`` is not positive.
    """
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return dist.get_world_size() > 1
    if os.environ.get("WORLD_SIZE", "") in ("", "1"):
        return False
    missing = [v for v in _ENV_VARS if not os.environ.get(v)]
    if missing:
        raise ValueError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} "
            "not set: launch with torchrun, which sets all of " + ", ".join(_ENV_VARS)
        )
    world, rk, local = _env_int("WORLD_SIZE"), _env_int("RANK"), _env_int("LOCAL_RANK")
    _env_int("MASTER_PORT")
    if world < 1 or not 0 <= rk < world:
        raise ValueError(f"need 0 <= RANK < WORLD_SIZE, got RANK={rk}, WORLD_SIZE={world}")
    if timeout_s is None:
        env_timeout = os.environ.get("ATTNKIT_DIST_TIMEOUT")
        timeout_s = float(env_timeout) if env_timeout else DEFAULT_TIMEOUT_S
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not \
            timeout_s > 0:
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl":
        torch.cuda.set_device(local)
    dist.init_process_group(backend, init_method="env://", rank=rk, world_size=world,
                            timeout=timedelta(seconds=float(timeout_s)))
    return True


def shutdown() -> None:
    """Leave the process group (after a barrier, so no rank exits while others still talk)."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def is_distributed() -> bool:
    """``True`` when a process group with more than one rank is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of ranks (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_rank() -> int:
    """Rank on this machine (``LOCAL_RANK``; 0 when unset)."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0) if is_distributed() else 0


def is_main_process() -> bool:
    """``True`` on rank 0 (and always when not distributed): the rank that prints and writes."""
    return rank() == 0


# ------------------------------------------------------------------------------ the model


class ApplyModule(nn.Module):
    """A module whose forward is ``fn(module, *args, **kwargs)``.

    ``DistributedDataParallel`` synchronizes the gradients of the parameters used inside its
    forward; wrapping ``ApplyModule(model)`` lets a whole training computation (several method
    calls, a loop over instances, a loss) run inside it::

        net = wrap_ddp(ApplyModule(model), find_unused_parameters=True)
        logits = net(lambda m, x: m.mlm_logits(m(x)), tokens)

    Args:
        module: the model.
        extra: further parameters the computation uses that are not in ``module`` (registered
            here so DDP averages their gradients too); ``fn`` reaches them by closure.
    """

    def __init__(self, module: nn.Module, extra: Mapping[str, nn.Parameter] | None = None):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        self.module = module
        for name, p in (extra or {}).items():
            if not isinstance(p, nn.Parameter):
                raise TypeError(f"extra[{name!r}] must be an nn.Parameter, got "
                                f"{type(p).__name__}")
            self.register_parameter(name, p)

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(self.module, *args, **kwargs)


def wrap_ddp(model: nn.Module, *, find_unused_parameters: bool = False,
             **ddp_kwargs: Any) -> nn.Module:
    """``DistributedDataParallel(model)`` when distributed, else ``model`` itself.

    The model's parameters and buffers are broadcast from rank 0 when wrapped, so every rank
    starts identical. On CUDA the model must already be on this rank's device
    (``cuda:LOCAL_RANK``). Set ``find_unused_parameters=True`` when some parameters get no
    gradient in a step (e.g. a head the loss does not use). Optimize ``model.parameters()``
    (the same tensors) and save ``model.state_dict()`` (or ``unwrap(wrapped)``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    param = next(model.parameters(), None)
    if param is not None and param.device.type == "cuda":
        ddp_kwargs.setdefault("device_ids", [param.device.index])
    return DistributedDataParallel(model, find_unused_parameters=find_unused_parameters,
                                   **ddp_kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` / :class:`ApplyModule` wrapper."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, ApplyModule)):
        model = model.module
    return model


# ------------------------------------------------------------------------------ the data


def _check_count(name: str, n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"{name} must be a non-negative int, got {n!r}")
    return n


def shard_range(n: int, rank_: int | None = None, world: int | None = None) -> range:
    """This rank's contiguous part of ``range(n)``: sizes differ by at most one (the first
    ``n % world`` ranks hold one more). ``rank_`` / ``world`` default to the process group's.

    Raises ``ValueError`` when ``0 < n < world`` (some rank would get nothing: a DDP step needs
    every rank to take part, so use at least ``world`` items per batch).
    """
    _check_count("n", n)
    world = world_size() if world is None else world
    rank_ = rank() if rank_ is None else rank_
    check_positive_int("world", world)
    if isinstance(rank_, bool) or not isinstance(rank_, int) or not 0 <= rank_ < world:
        raise ValueError(f"rank must be an int in [0, {world}), got {rank_!r}")
    if 0 < n < world:
        raise ValueError(f"cannot split {n} item(s) over {world} ranks: every rank needs at "
                         f"least one; use a batch of at least {world}")
    base, extra = divmod(n, world)
    start = rank_ * base + min(rank_, extra)
    return range(start, start + base + (rank_ < extra))


def shard_slice(n: int) -> slice:
    """:func:`shard_range` as a ``slice`` (``slice(0, n)`` when not distributed)."""
    r = shard_range(n)
    return slice(r.start, r.stop)


S = TypeVar("S", Tensor, Sequence)


def shard(batch: S, dim: int = 0) -> S:
    """This rank's contiguous part of ``batch`` along ``dim`` (a tensor, or a list / tuple
    along its items); ``batch`` itself when not distributed."""
    if not is_distributed():
        return batch
    if isinstance(batch, Tensor):
        if batch.dim() == 0:
            raise ValueError("batch must have at least one dimension to shard")
        r = shard_range(batch.shape[dim])
        return batch.narrow(dim, r.start, len(r))
    if isinstance(batch, (list, tuple)):
        if dim != 0:
            raise ValueError(f"a list / tuple batch shards along its items (dim 0), got {dim}")
        r = shard_range(len(batch))
        return batch[r.start:r.stop]
    raise TypeError(f"batch must be a tensor, list or tuple, got {type(batch).__name__}")


def shard_mask(mask: Tensor) -> Tensor:
    """This rank's share of the ``True`` entries of a bool ``mask`` (contiguous in flattened
    order); ``mask`` itself when not distributed."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError("mask must be a bool tensor")
    if not is_distributed():
        return mask
    idx = mask.reshape(-1).nonzero().squeeze(1)
    r = shard_range(idx.numel())
    out = torch.zeros_like(mask).reshape(-1)
    out[idx[r.start:r.stop]] = True
    return out.view_as(mask)


# ----------------------------------------------------------------------- losses and metrics


def rescale_mean(loss: Tensor, count: int | float | Tensor) -> Tensor:
    """Make a local mean loss DDP-exact: the rank-averaged gradient of the result is the
    gradient of the mean over all ranks' items.

    ``loss`` is this rank's mean over ``count`` items (or a weighted mean whose weights sum to
    ``count``). Returns ``loss * count * world / total`` with ``total`` the sum of ``count``
    over ranks (one small all-reduce): DDP divides the summed gradients by ``world``, leaving
    ``sum over all items / total``. A rank with ``count == 0`` (e.g. no masked token in its
    shard) contributes zero, also when its local mean over no items is NaN (``0 / 0``: the
    gradient of such a mean, or of ``cross_entropy`` with every target ignored, is zero; a loss
    whose own gradient is NaN stays NaN). Returns ``loss`` itself when not distributed.
    :func:`all_reduce_mean` of the result is the global mean loss.
    """
    if not isinstance(loss, Tensor):
        raise TypeError(f"loss must be a tensor, got {type(loss).__name__}")
    if not is_distributed():
        return loss
    c = torch.as_tensor(count, dtype=torch.float64).detach().reshape(())
    if not bool(torch.isfinite(c)) or float(c) < 0:
        raise ValueError(f"count must be a finite non-negative number, got {float(c)!r}")
    total = c.clone().to(_collective_device())
    dist.all_reduce(total)
    total_f = float(total)
    if float(c) == 0 or total_f == 0:  # nothing to learn here (or anywhere): zero gradient
        return torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0) * 0.0
    return loss * (float(c) * world_size() / total_f)


def _collective_device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(x: T) -> T:
    """The mean of ``x`` (a tensor or a Python number) over ranks, on every rank (detached);
    ``x`` itself when not distributed. Every rank must call it with the same shape."""
    if not is_distributed():
        return x
    if isinstance(x, Tensor):
        t = x.detach().clone().to(_collective_device())
        dist.all_reduce(t)
        return (t / world_size()).to(x.device)  # type: ignore[return-value]
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        t = torch.tensor(float(x), dtype=torch.float64, device=_collective_device())
        dist.all_reduce(t)
        return float(t) / world_size()  # type: ignore[return-value]
    raise TypeError(f"x must be a tensor or a number, got {type(x).__name__}")


def run_on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn(*args, **kwargs)`` on rank 0 only and return its (picklable) result on every
    rank: for measurements (timings, memory) that must not run once per rank. An exception on
    rank 0 is re-raised on every rank. Plain call when not distributed."""
    if not is_distributed():
        return fn(*args, **kwargs)
    box: list[Any] = [None]
    if is_main_process():
        try:
            box[0] = ("ok", fn(*args, **kwargs))
        except Exception as e:  # share the failure so the other ranks do not wait forever
            box[0] = ("error", f"{type(e).__name__}: {e}")
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise RuntimeError(f"rank 0 raised in {getattr(fn, '__name__', 'fn')}: {value}")
    return value
