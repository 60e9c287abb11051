"""FSDP under the training loop: the model's parameters and optimizer state sharded over the processes.

Launch as Accelerate's FSDP2 launches are made (`accelerate launch --use_fsdp --fsdp_version 2 ...`,
or torchrun with ``ACCELERATE_USE_FSDP=true FSDP_VERSION=2``). The loop needs three things a
data-parallel run does not:

- checkpoints hold whole tensors, gathered from every process (`full_model_state`,
  `full_optimizer_state`) and written by the main process alone, in the format every other run
  writes: a sharded run resumes unsharded and the other way round;
- a resumed optimizer state goes in after the model is sharded (`load_optimizer_state`);
- every process runs validation, since a forward pass gathers the parameters from all of them.

Accelerate shards only on accelerators; on CPU processes (gloo) `accelerator_for` sets the same
FSDP2 path up itself, so the sharded path can be run and tested on a machine without a GPU.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch

FSDP_ENV = "ACCELERATE_USE_FSDP"


class ShardingError(Exception):
    """A sharded launch the loop cannot run (FSDP1, DeepSpeed, a model that needs whole replicas)."""


def fsdp_requested() -> bool:
    """True when the launcher asked for FSDP (accelerate launch --use_fsdp sets this)."""
    return os.environ.get(FSDP_ENV, "false").strip().lower() in ("1", "true", "yes")


def accelerator_for(mixed_precision: str):
    """The trainer's Accelerator: on GPUs as Accelerate makes it from the launch; FSDP2 on CPU
    processes set up here, because Accelerate turns a CPU launch into plain data parallelism."""
    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if fsdp_requested():  # the models' outputs are views (logits reshaped) that nothing changes in place
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    on_cpu = not torch.cuda.is_available()
    if not (on_cpu and fsdp_requested()):
        return Accelerator(mixed_precision=mixed_precision, cpu=on_cpu, step_scheduler_with_optimizer=False)
    if os.environ.get("FSDP_VERSION", "1") != "2":
        raise ShardingError("FSDP on CPU processes runs FSDP2 only: launch with --fsdp_version 2 "
                            "(or FSDP_VERSION=2)")
    plugin = FullyShardedDataParallelPlugin(cpu_ram_efficient_loading=False)  # the rest from the launch
    acc = Accelerator(mixed_precision=mixed_precision, cpu=True, fsdp_plugin=plugin,
                      step_scheduler_with_optimizer=False)
    if acc.num_processes > 1 and acc.distributed_type == DistributedType.MULTI_CPU:
        # Accelerate promotes only accelerator launches to FSDP (AcceleratorState.__init__)
        acc.state.distributed_type = DistributedType.FSDP
        acc.state.fsdp_plugin = plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return acc


def is_sharded(acc) -> bool:
    """True when the run shards its model; raises ShardingError for sharded launches it cannot run."""
    kind = acc.distributed_type.name
    if kind == "DEEPSPEED":
        raise ShardingError("DeepSpeed launches are not supported: launch FSDP2 instead "
                            "(accelerate launch --use_fsdp --fsdp_version 2; docs/SCALE_OUT.md)")
    if kind != "FSDP":
        return False
    if not acc.is_fsdp2:
        raise ShardingError("FSDP1 launches are not supported: launch with --fsdp_version 2 (docs/SCALE_OUT.md)")
    return True


def full_model_state(acc, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every process calls this: the whole weights on the main process's CPU (empty elsewhere)."""
    return acc.get_state_dict(model)


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Every process calls this: the whole optimizer state on the main process, in the positional
    layout of torch's Optimizer.state_dict() (the layout unsharded checkpoints keep)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    by_name = get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))
    if not by_name:
        return {}
    position, groups = {}, []
    for group in by_name["param_groups"]:
        ids = []
        for name in group["params"]:
            position[name] = len(position)
            ids.append(position[name])
        groups.append({**group, "params": ids})
    return {"state": {position[name]: entry for name, entry in by_name["state"].items()}, "param_groups": groups}


def optimizer_parameter_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the optimizer's parameters in its positional order (before the model is sharded)."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                         names: list[str]) -> None:
    """Every process calls this after sharding: `state` is a whole positional state (from a
    checkpoint, on every process), `names` the parameter names of its positions."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    groups, start = [], 0
    for group in state["param_groups"]:
        count = len(group["params"])
        groups.append({**group, "params": names[start:start + count]})
        start += count
    by_name = {"state": {names[int(k)]: v for k, v in state["state"].items()}, "param_groups": groups}
    try:  # not strict: a parameter that never had a gradient has no state, as in an unsharded resume
        set_optimizer_state_dict(model, optimizer, by_name, options=_options(strict=False))
    except (KeyError, RuntimeError, ValueError) as e:
        raise ShardingError(f"cannot put the checkpoint's optimizer state into the sharded model: {e}") from None
