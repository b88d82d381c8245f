"""FSDP2 (``fully_shard``): what MISA supports, the shard group, and the local shards.

Under FSDP2 the parameters are ``DTensor`` shards and FSDP averages the gradients itself
(a reduce-scatter of the modules that received one); MISA keeps fp32 masters and moments
for this rank's shard of the active modules only and sums squared norms over the shards.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch < 2.5
    from torch.distributed._tensor import DTensor


def is_fsdp2(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are FSDP2 (``fully_shard``) shards; raise
    ``NotImplementedError`` for the sharding MISA cannot handle (FSDP1, tensor parallel)."""
    fsdp2 = False
    for name, module in model.named_modules():
        classes = {cls.__name__ for cls in type(module).__mro__}
        if "FullyShardedDataParallel" in classes:
            raise NotImplementedError(f"model: {name or 'the model'} is wrapped in FSDP1 (FullyShardedDataParallel); "
                                      "MISA supports FSDP2: shard with torch.distributed.fsdp.fully_shard")
        fsdp2 = fsdp2 or "FSDPModule" in classes
    sharded = [(name, param) for name, param in model.named_parameters() if isinstance(param, DTensor)]
    if sharded and not fsdp2:
        raise NotImplementedError(f"model: parameter {sharded[0][0]} is a DTensor outside FSDP2 (tensor "
                                  "parallel?); MISA supports DDP and FSDP2 (fully_shard) only")
    if fsdp2 and not hasattr(model, "_get_fsdp_state"):
        raise NotImplementedError("model: FSDP2 shards some of its modules but not the model itself; call "
                                  "fully_shard(model) on the root too, after its layers, and give MISA the root")
    for name, param in sharded:
        if param.device_mesh.ndim != 1 or param.device_mesh != sharded[0][1].device_mesh:
            raise NotImplementedError(f"model: parameter {name} is sharded over a {param.device_mesh.ndim}-D or "
                                      "different mesh (HSDP?); MISA supports FSDP2 on one 1-D mesh")
    return fsdp2


def shard_group(model: nn.Module):
    """The process group FSDP2 shards ``model``'s parameters over (None if unsharded)."""
    for param in model.parameters():
        if isinstance(param, DTensor):
            return param.device_mesh.get_group()
    return None


def lazy_init_fsdp2(root: nn.Module) -> None:
    """Run FSDP2's lazy initialisation of the sharded ``root`` while every parameter still
    requires grad.

    FSDP2 fixes each group's mixed-precision dtypes at the first forward from the
    parameters that require grad then; a group that MISA had frozen would get none and
    fail once its modules are sampled."""
    root._get_fsdp_state()._lazy_init()


def local(tensor: Optional[Tensor]) -> Optional[Tensor]:
    """The shard this rank holds of an FSDP2 ``DTensor`` (a view), else ``tensor`` itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor
