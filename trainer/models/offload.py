"""Block offload (precision.offload_blocks): the frozen weights of some of a transformer's blocks wait in CPU memory,
and each block's come to the device just before it runs, the next block's on a side CUDA stream while this one
computes (prefetch), as sd-scripts' --blocks_to_swap and diffusers' block-level group offloading do.

Written here rather than taken from diffusers (hooks/group_offloading.py, 0.42), which does this for inference:
- it moves every parameter of a block, the trainable LoRA weights peft injects into it included, so their gradients
  and the optimizer's state would sit on another device than the weights; with streams it even sets each parameter
  back to the copy it pinned at setup (ModuleGroup._offload_to_memory), which would undo every optimizer step;
- its prefetch follows the forward order only, while a training step's backward recomputes the blocks in reverse
  (gradient checkpointing), and a block fetched ahead that never runs again would stay on the card.
This one moves only frozen tensors (LoRA weights stay on the device) and prefetches in the direction the blocks run.

Training needs gradient checkpointing with it: without, autograd keeps every block's weights for the backward pass
(the saved views of each Linear's weight), and nothing would leave the card.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch


class BlockOffload:
    """Hooks on `blocks` (in the order the model runs them) keeping their frozen tensors in CPU memory between runs."""

    def __init__(self, blocks: list[torch.nn.Module], device: torch.device):
        self.blocks, self.device = blocks, torch.device(device)
        cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        # per block: each frozen parameter or buffer -> its CPU copy (pinned on CUDA, so copies can run async)
        self.stored = [{t: _host(t, pin=cuda) for t in frozen_tensors(b)} for b in blocks]
        self.owned = {id(t) for tensors in self.stored for t in tensors}
        for tensors in self.stored:
            for t, host in tensors.items():
                t.data = host
        self.onloaded: dict[int, torch.cuda.Event | None] = {}  # block -> when its copy is done (None: done)
        self.last = -1  # the block that ran last: which way the blocks are running (forward or recomputed backward)
        self.handles = [h for i, b in enumerate(blocks) for h in (
            b.register_forward_pre_hook(lambda _m, _a, i=i: self.before(i)),
            b.register_forward_hook(lambda _m, _a, _o, i=i: self.after(i)))]

    def owns(self, t: torch.Tensor) -> bool:
        return id(t) in self.owned

    def before(self, i: int) -> None:
        """Block i is about to run: its weights on the device (waiting for a prefetch), the next one's on the way,
        and any other block's back in CPU memory. (A block the backward pass recomputed may never reach `after`:
        torch.utils.checkpoint stops a recomputation once it has every tensor it needs, its "early stop".)"""
        step = -1 if i < self.last else 1  # below the last one: the backward pass recomputing in reverse
        self.last = i
        ahead = i + step if 0 <= i + step < len(self.blocks) else None
        for done in [j for j in self.onloaded if j not in (i, ahead)]:
            self.after(done)
        self.onload(i)
        event = self.onloaded[i]
        if event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)
            for t in self.stored[i]:  # the side stream allocated them: free only once this stream is done with them
                t.data.record_stream(compute)
            self.onloaded[i] = None
        if ahead is not None:
            self.onload(ahead)

    def after(self, i: int) -> None:
        """Block i has run: its frozen tensors point at their CPU copies again; the device copy is freed once autograd
        no longer holds it (at once under gradient checkpointing or without gradients)."""
        for t, host in self.stored[i].items():
            t.data = host
        self.onloaded.pop(i, None)

    def onload(self, i: int) -> None:
        if i in self.onloaded:
            return
        with torch.cuda.stream(self.stream) if self.stream is not None else nullcontext():
            for t, host in self.stored[i].items():
                # copy=True: on a CPU run too the block computes with its own copy, as it would on a card
                t.data = host.to(self.device, non_blocking=self.stream is not None, copy=True)
            self.onloaded[i] = self.stream.record_event() if self.stream is not None else None

    def release(self) -> None:
        """Every block's tensors back at their CPU copies (the first block a backward pass recomputed stays on the
        device until the next block runs; remove() and the tests call this)."""
        for i in list(self.onloaded):
            self.after(i)

    def remove(self) -> None:
        """The hooks off and every frozen tensor back in CPU memory, as before offloading."""
        self.release()
        for h in self.handles:
            h.remove()


def frozen_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """What offloading moves: parameters that do not train (peft's LoRA weights do) and buffers."""
    return [p for p in module.parameters() if not p.requires_grad] + list(module.buffers())


def _host(t: torch.Tensor, pin: bool) -> torch.Tensor:
    host = t.data.to("cpu")
    return host.pin_memory() if pin else host


def offloaded_blocks(blocks: list[torch.nn.Module], count: int) -> list[torch.nn.Module]:
    """The last `count` blocks in running order (all of them when count is larger). (sd-scripts' FLUX swap counts a
    double-stream block as two single ones, library/flux_models.py enable_block_swap; this counts blocks.)"""
    return blocks[max(len(blocks) - count, 0):] if count > 0 else []


def move_except(module: torch.nn.Module, device, offload: BlockOffload | None) -> None:
    """Module.to(device) for every parameter and buffer the offload does not keep in CPU memory."""
    if offload is None:
        module.to(device)
        return
    # Module.to's own path (_apply: parameters keep their identity where torch allows, buffers are replaced), with
    # the offloaded tensors passed through as they are
    module._apply(lambda t: t if offload.owns(t) else t.to(device))
