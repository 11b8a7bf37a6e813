"""A pruning's validation after a scoring pass under inference mode (the int8 search scores the
torch model that way before auto's pruning budget is measured): the module's metric states were
left as inference tensors, and the pruning budget's validation failed with torch's "Inplace update
to inference tensor outside InferenceMode" traceback."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from kiln.compression import pruning
from kiln.models.metrics import MeanLoss


class Scored(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(4, 2)
        self.val_loss = MeanLoss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> None:
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x), y)
        self.val_loss.update(loss.reshape(1), torch.tensor([float(len(x))]))
        self.log("val/loss", self.val_loss, on_epoch=True)


class Data(L.LightningDataModule):
    def val_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        x, y = torch.randn(12, 4, generator=generator), torch.arange(12) % 2
        return DataLoader(TensorDataset(x, y), batch_size=4)


def test_the_pruning_budget_validates_after_a_pass_under_inference_mode():
    module, data = Scored(), Data()
    with torch.inference_mode():  # as an evaluation trainer scores it
        module.val_loss.reset()
        module.val_loss.update(torch.tensor([1.0]), torch.tensor([4.0]))
    assert module.val_loss.loss_sum.is_inference()
    logged = pruning.validate(module, data, {"accelerator": "cpu", "devices": 1})
    with torch.no_grad():
        x, y = next(iter(data.val_dataloader().dataset.tensors[i] for i in [0])), torch.arange(12) % 2
        expected = torch.nn.functional.cross_entropy(module(x), y).item()
    assert abs(logged["val/loss"] - expected) < 1e-6  # the earlier pass's row is not counted
