"""A model saved mid-warmup and reloaded continues with the same ProRes values and outputs."""

import pytest
import torch

from megatron_prores.checkpointing import load_model, save_model
from megatron_prores.config import MethodConfig, ModelConfig
from megatron_prores.layer import prores_layers, set_prores_step
from megatron_prores.model import build_model
from megatron_prores.parallel import seed_everything

pytestmark = pytest.mark.stack  # CI's Python 3.12 / megatron-core 0.19 leg too


def make(seed):
    method = MethodConfig(norm_type="mix", prores_schedule="linear", prores_warmup_steps=400,
                          gpas=True, gpas_gate="sublayer")
    cfg = ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48,
                      vocab_size=64, seq_length=8, method=method)
    seed_everything(seed)
    return build_model(cfg)


def logits(chunks):
    tokens = torch.arange(16).remainder(64).view(2, 8)
    return chunks[0](tokens, torch.arange(8)[None].expand(2, 8), None)


def test_reload_mid_warmup_continues_with_same_values(single_process, tmp_path):
    step = 150  # mid-warmup: T = 100, blocks 1 done, 2-4 ramping
    original = make(seed=1)
    with torch.no_grad():  # trained-looking gates
        for layer in prores_layers(original):
            layer.gpas_gate.copy_(torch.tensor([0.3, -0.2]) * layer.layer_number)
    set_prores_step(original, step)
    save_model(original, str(tmp_path / "ckpt"))

    restored = make(seed=2)  # different init: everything must come from the checkpoint
    assert not torch.equal(logits(restored), logits(original))
    load_model(restored, str(tmp_path / "ckpt"))
    set_prores_step(restored, step)  # the value is derived from the iteration alone
    after = [l.prores_scale.item() for l in prores_layers(restored)]
    assert after == pytest.approx([min(step / (100 * l), 1.0) for l in range(1, 5)], rel=1e-7)  # T = 400 / 4
    assert [l.prores_active for l in prores_layers(restored)] == [False, True, True, True]
    assert torch.equal(logits(restored), logits(original))
    for a, b in zip(prores_layers(original), prores_layers(restored)):
        assert torch.equal(a.gpas_gate, b.gpas_gate)
    # continuing: the next step's values agree too
    set_prores_step(original, step + 1)
    set_prores_step(restored, step + 1)
    assert torch.equal(logits(restored), logits(original))


def test_checkpoint_metadata_with_tensor_strides_loads(single_process, tmp_path, monkeypatch):
    """torch 2.15 reads every checkpoint's tensor properties with a ``strides`` field, which
    megatron-core (0.16-0.19) passes on to torch.empty: no checkpoint loaded (TypeError). Here
    the field is put into the metadata as torch 2.15 reads it; megatron-core's own reader fails
    on it, the driver's load gives back the saved weights."""
    from megatron.core.dist_checkpointing.strategies import torch as strategies
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    original = make(seed=1)
    save_model(original, str(tmp_path / "ckpt"))
    read = FileSystemReader.read_metadata

    def read_as_torch_2_15(self):
        metadata = read(self)
        for item in metadata.state_dict_metadata.values():
            if isinstance(item, TensorStorageMetadata):
                # contiguous, as torch 2.15 records it
                item.properties.__dict__["strides"] = torch.empty(item.size, device="meta").stride()
        return metadata

    monkeypatch.setattr(FileSystemReader, "read_metadata", read_as_torch_2_15)
    raw = strategies._get_filesystem_reader(str(tmp_path / "ckpt")).read_metadata()
    assert all("strides" in i.properties.__dict__ for i in raw.state_dict_metadata.values()
               if isinstance(i, TensorStorageMetadata))
    unwrapped = getattr(strategies.TorchDistLoadShardedStrategy.load_tensors_metadata, "__wrapped__", None)
    if unwrapped is None:  # the driver has not loaded anything yet in this process
        unwrapped = strategies.TorchDistLoadShardedStrategy.load_tensors_metadata
    with pytest.raises(TypeError, match="strides"):
        unwrapped(strategies.TorchDistLoadShardedStrategy(), tmp_path / "ckpt", raw)

    restored = make(seed=2)
    load_model(restored, str(tmp_path / "ckpt"))
    assert torch.equal(logits(restored), logits(original))
    # what megatron-core was handed is a copy: the metadata read keeps its field
    assert all("strides" in i.properties.__dict__ for i in raw.state_dict_metadata.values()
               if isinstance(i, TensorStorageMetadata))


def test_adam_state_fixups_apply_to_torch_adam_only():
    """The resume fix-ups (prime, restore 'step') are for torch's Adam inside megatron's
    DistributedOptimizer; Transformer Engine's FusedAdam (any other inner optimizer) is left alone."""
    from megatron_prores.checkpointing import _restore_adam_step, _torch_adam_distributed

    class DistributedOptimizer:  # megatron's class name is what the fix-ups look for
        def __init__(self, inner):
            self.optimizer = inner

    class FusedAdam(torch.optim.Optimizer):  # stands for TE's: not a torch.optim.Adam subclass
        def __init__(self, params):
            super().__init__(params, {"lr": 1e-3})

    p = torch.nn.Parameter(torch.zeros(2))
    torch_adam = DistributedOptimizer(torch.optim.AdamW([p]))
    fused = DistributedOptimizer(FusedAdam([p]))
    fused.optimizer.state[p] = {"step": torch.tensor(3.0)}
    torch_adam.optimizer.state[p] = {"step": torch.tensor(3.0)}

    class Chained:
        chained_optimizers = [torch_adam, fused]

    assert _torch_adam_distributed(Chained()) == [torch_adam]
    _restore_adam_step(Chained(), 7)
    assert torch_adam.optimizer.state[p]["step"].item() == 7.0
    assert fused.optimizer.state[p]["step"].item() == 3.0


def test_a_background_checkpoint_finished_by_the_next_save_is_reported(single_process, monkeypatch, capsys):
    """A background write still in flight when the next save starts is finished by that save: its
    "saved checkpoint" line must still be printed (it was lost, and with it the only sign that the
    checkpoint became the latest)."""
    from types import SimpleNamespace

    from megatron_prores import trainer as trainer_module

    class Saver:  # megatron-core's async writer, reduced to what the Checkpointer sees
        in_flight = 20

        def poll(self, blocking=False):
            if not blocking:
                return None
            done, self.in_flight = self.in_flight, None
            return done

        def save(self, iteration, *args):
            assert self.in_flight is None, "a new save started with a checkpoint still in flight"
            self.in_flight = iteration
            return False

    monkeypatch.setattr(trainer_module, "state_is_finite", lambda model, optimizer: True)
    ckpt = trainer_module.Checkpointer.__new__(trainer_module.Checkpointer)
    ckpt.args = SimpleNamespace(save="/runs/a", async_save=True)
    ckpt.arch = ckpt.export_config = ckpt.run_flags = {}
    ckpt.saver = Saver()
    state = SimpleNamespace(iteration=40, state_dict=dict)
    ckpt._save(SimpleNamespace(model=None, optimizer=None, scheduler=None, state=state), 0.0, 40)
    out = capsys.readouterr().out
    assert "saved checkpoint at iteration 20 to /runs/a in the background" in out
    assert out.index("iteration 20") < out.index("writing checkpoint 40 in the background")
