"""Block offload (precision.offload_blocks, trainer/models/offload.py): the frozen weights of a transformer's blocks
wait in CPU memory and each block's come to the device as it runs. On this CPU the "device" copy is a real copy,
so what a card would hold is observable: how many blocks' copies are alive at once, and that the trained adapter
is the one training without offload gives."""
from __future__ import annotations

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from test_flux import ALL_GROUPS, train
from tiny_flux import tiny_flux_components
from trainer.__main__ import main
from trainer.formats import load_adapter
from trainer.models.offload import BlockOffload, frozen_tensors


@pytest.mark.parametrize("fp8", [False, True])
def test_offloading_three_of_four_blocks_trains_the_same_adapter(tiny_flux_dir, tmp_path, monkeypatch, fp8):
    runs_of_offloaded_blocks = []
    before = BlockOffload.before
    monkeypatch.setattr(BlockOffload, "before", lambda self, i: runs_of_offloaded_blocks.append(i) or before(self, i))
    common = (ALL_GROUPS, "network.text_encoders=['te1']", "precision.gradient_checkpointing=true",
              f"precision.fp8_base={str(fp8).lower()}")
    plain = load_adapter(str(train(tiny_flux_dir, tmp_path / "plain", *common, steps=6) / "flux.safetensors"))
    assert not runs_of_offloaded_blocks
    run_dir = train(tiny_flux_dir, tmp_path / "offload", *common, "precision.offload_blocks=3",
                    "sampling.every_n_steps=6", steps=6)
    # blocks 1-3 of 0-3 (0-2 of the offloaded), forward and recomputed backward, 6 steps; then the samples
    assert runs_of_offloaded_blocks[:6] == [0, 1, 2, 2, 1, 0] and len(runs_of_offloaded_blocks) > 36
    assert list((run_dir / "samples").glob("*.png"))
    offloaded = load_adapter(str(run_dir / "flux.safetensors"))
    assert plain.layers.keys() == offloaded.layers.keys()
    worst = max((a.up @ a.down - b.up @ b.down).abs().max().item() / (a.up @ a.down).abs().max().item()
                for a, b in ((plain.layers[k], offloaded.layers[k]) for k in plain.layers))
    print(f"6 steps with 3 of 4 blocks offloaded{' over fp8 weights' if fp8 else ''}: largest delta difference "
          f"{worst:.2e} of the delta's largest entry")
    assert worst < 1e-5


class Watched(BlockOffload):
    """A BlockOffload that records, before each block runs, how many blocks' device copies are still alive."""

    def __init__(self, *args):
        self.copies: dict[int, list[StorageWeakRef]] = {}
        self.alive_before: list[int] = []
        self.resident: list[list[int]] = []  # the blocks on the device once each block is about to run
        super().__init__(*args)

    def onload(self, i):
        super().onload(i)
        self.copies[i] = [StorageWeakRef(t.data.untyped_storage()) for t in self.stored[i]]

    def before(self, i):
        self.alive_before.append(self.alive())
        super().before(i)
        self.resident.append(sorted(self.onloaded))

    def alive(self) -> int:
        return sum(any(not ref.expired() for ref in refs) for refs in self.copies.values())


def _step(checkpointing: bool):
    """One forward and backward pass of the tiny FLUX transformer with every block offloaded; the offload."""
    model = tiny_flux_components()["transformer"]
    model.requires_grad_(False)
    model.x_embedder.requires_grad_(True)  # trained before the blocks: the gradient flows back through each
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    offload = Watched([*model.transformer_blocks, *model.single_transformer_blocks], torch.device("cpu"))
    torch.manual_seed(0)
    out = model(hidden_states=torch.randn(1, 16, 64), encoder_hidden_states=torch.randn(1, 4, 40),
                pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]), guidance=torch.tensor([1.0]),
                img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(4, 3)).sample
    after_forward = offload.alive()
    out.square().mean().backward()
    return model, offload, after_forward


def test_with_gradient_checkpointing_at_most_two_blocks_are_on_the_device_at_once():
    model, offload, after_forward = _step(checkpointing=True)
    # forward: the running block and the next one (prefetched); the backward pass recomputes in reverse, the same
    print(f"blocks' device copies alive before each of {len(offload.alive_before)} block runs (4 blocks, forward "
          f"then recomputed backward): {offload.alive_before}")
    assert len(offload.alive_before) == 8 and max(offload.alive_before) <= 2
    # each block with the next one fetched ahead, forward then in reverse (the last block has none ahead of it)
    assert offload.resident == [[0, 1], [1, 2], [2, 3], [3], [3], [1, 2], [0, 1], [0]]
    # the first block the backward pass recomputed stays until the next block runs (the next step's first)
    assert after_forward == 0 and offload.alive() == 1
    offload.release()
    assert offload.alive() == 0
    for tensors in offload.stored:  # every frozen tensor points at its CPU copy again
        assert all(t.data_ptr() == host.data_ptr() for t, host in tensors.items())
    assert model.x_embedder.weight.grad is not None


def test_without_gradient_checkpointing_autograd_keeps_every_block_on_the_device():
    """Why config_problems asks for gradient checkpointing: the saved weights of each block outlive the offload."""
    _, offload, after_forward = _step(checkpointing=False)
    assert after_forward == 4 and offload.alive() == 0


def test_lora_weights_are_not_offloaded_and_an_offloaded_step_equals_a_plain_one():
    torch.manual_seed(1)
    block = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    block[0].requires_grad_(False)
    x = torch.randn(2, 4)
    expected = block(x).sum()
    offload = BlockOffload([block], torch.device("cpu"))
    assert [id(t) for t in offload.stored[0]] == [id(t) for t in frozen_tensors(block)]
    assert not any(offload.owns(p) for p in block[1].parameters())  # the trained ones stay put
    assert torch.equal(block(x).sum(), expected)
    offload.remove()
    assert not block._forward_pre_hooks and not block._forward_hooks


def test_offload_needs_gradient_checkpointing_and_transformer_blocks(tiny_model_dir, image_dir, tmp_path, capsys):
    sets = [f"model.path={tiny_model_dir}", f"dataset.path={image_dir}", f"saving.runs_dir={tmp_path}",
            "schedule.max_steps=1", "precision.offload_blocks=2"]
    assert main(["train", "--quiet", *[x for s in sets for x in ("--set", s)]]) == 2
    assert "precision.offload_blocks needs precision.gradient_checkpointing = true" in capsys.readouterr().err
    assert main(["train", "--quiet", *[x for s in [*sets, "precision.gradient_checkpointing=true"]
                                      for x in ("--set", s)]]) == 2
    err = capsys.readouterr().err
    assert "precision.offload_blocks" in err and "no transformer blocks" in err and "Traceback" not in err


@pytest.mark.parametrize("count, expected", [(0, 0), (1, 1), (3, 3), (99, 4)])
def test_the_last_n_blocks_are_offloaded(count, expected):
    from trainer.models.offload import offloaded_blocks
    blocks = [torch.nn.Linear(1, 1) for _ in range(4)]
    chosen = offloaded_blocks(blocks, count)
    assert len(chosen) == expected and all(b is blocks[4 - expected + i] for i, b in enumerate(chosen))


class Poisoned(BlockOffload):
    """After a block runs, its frozen tensors point at NaNs instead of their CPU copies: any computation that reads
    a weight outside its block's run (a backward pass reading a saved weight, as it would read the CPU copy on a
    card) gives NaN."""

    def after(self, i):
        super().after(i)
        for t in self.stored[i]:
            t.data = torch.full_like(t.data, float("nan"))

    def onload(self, i):
        if i not in self.onloaded:
            for t, host in self.stored[i].items():
                t.data = host
        super().onload(i)


def _gradients(offload_class=None):
    model = tiny_flux_components()["transformer"]
    model.requires_grad_(False)
    model.x_embedder.requires_grad_(True)
    model.enable_gradient_checkpointing()  # diffusers' default: non-reentrant torch.utils.checkpoint
    model.train()
    if offload_class:
        offload_class([*model.transformer_blocks, *model.single_transformer_blocks], torch.device("cpu"))
    torch.manual_seed(0)
    out = model(hidden_states=torch.randn(1, 16, 64), encoder_hidden_states=torch.randn(1, 4, 40),
                pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]), guidance=torch.tensor([1.0]),
                img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(4, 3)).sample
    out.square().mean().backward()
    return model.x_embedder.weight.grad


def test_the_backward_pass_reads_only_weights_brought_in_for_it():
    plain, poisoned = _gradients(), _gradients(Poisoned)
    assert torch.isfinite(poisoned).all() and torch.equal(plain, poisoned)


def test_move_except_leaves_the_offloaded_tensors_in_cpu_memory():
    from trainer.models.offload import move_except
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[2].requires_grad_(False)
    offload = BlockOffload([model[1], model[2]], torch.device("cpu"))
    move_except(model, "meta", offload)
    assert {p.device.type for p in model[0].parameters()} == {"meta"}
    assert {p.device.type for p in model[1].parameters()} == {"meta"}  # trains: not offloaded
    assert {p.device.type for p in model[2].parameters()} == {"cpu"}
