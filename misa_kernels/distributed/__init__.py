"""MISA under ``torch.distributed``: data parallelism with or without a DDP wrapper, and FSDP2.

* :mod:`.grad_sync`: :class:`GradSync` averages the gradients MISA applies (the active set
  and the dense parameters: ``delta`` of the model) once per backward;
* :mod:`.ddp`: :class:`DDPTakeover` keeps the reducer of a DDP wrapper switched off while
  honouring its ``no_sync()``;
* :mod:`.fsdp2`: what MISA supports of FSDP2 (``fully_shard``), local shards;
* :mod:`.collectives`: the collectives themselves (averaging, presence flags, same-draw
  check, sums over shards).
"""
from .collectives import any_rank_, average_, check_same_draw, reduce_over_shards_, world_size
from .ddp import DDPTakeover, unwrap_ddp
from .fsdp2 import DTensor, is_fsdp2, lazy_init_fsdp2, local, shard_group
from .grad_sync import GradSync, output_tensors, track_arrivals

__all__ = [
    "DDPTakeover", "DTensor", "GradSync", "any_rank_", "average_", "check_same_draw", "is_fsdp2",
    "lazy_init_fsdp2", "local", "output_tensors", "reduce_over_shards_", "shard_group", "track_arrivals",
    "unwrap_ddp", "world_size",
]
