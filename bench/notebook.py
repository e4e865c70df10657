"""The notebook's algorithm, re-implemented faithfully for timing (its bugs do not cost time).

Every epoch streams every image through a DataLoader with the weights' eval transforms and the
WHOLE ResNet18, with the frozen backbone left in train mode; early stopping on val loss; phase 2
unfreezes layer4 and goes on at a small learning rate. Each phase ends with a test evaluation.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, Subset


@dataclass
class NotebookTimes:
    transfer_s: float
    finetune_s: float
    transfer_epochs: int
    finetune_epochs: int


def _loaders(root: Path, batch_size: int, workers: int, val_ratio: float, seed: int):
    transform = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.transforms()
    train_full = torchvision.datasets.ImageFolder(root / "train", transform=transform)
    test = torchvision.datasets.ImageFolder(root / "test", transform=transform)
    order = torch.randperm(len(train_full), generator=torch.Generator().manual_seed(seed))
    n_val = round(len(train_full) * val_ratio)
    val, train = Subset(train_full, order[:n_val]), Subset(train_full, order[n_val:])

    def loader(ds, shuffle):
        return DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=workers,
            persistent_workers=workers > 0,
        )

    return loader(train, True), loader(val, False), loader(test, False), len(train_full.classes)


def _epoch(model, loader, optimizer=None):
    model.train(optimizer is not None)  # the notebook: backbone BatchNorm in train mode too
    total, count = 0.0, 0
    with torch.set_grad_enabled(optimizer is not None):
        for images, labels in loader:
            loss = nn.functional.cross_entropy(model(images), labels)
            if optimizer is not None:
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            total += loss.item() * len(labels)
            count += len(labels)
    return total / count


def _fit(model, params, lr, epochs, patience, train, val):
    optimizer = torch.optim.Adam(params, lr=lr)
    best, best_state, waited, ran = float("inf"), None, 0, 0
    for _ in range(epochs):
        _epoch(model, train, optimizer)
        val_loss = _epoch(model, val)
        ran += 1
        if val_loss < best:
            best, best_state, waited = val_loss, copy.deepcopy(model.state_dict()), 0
        else:
            waited += 1
            if waited >= patience:
                break
    model.load_state_dict(best_state)
    return ran


def run_notebook(
    root: Path,
    *,
    transfer_epochs: int,
    finetune_epochs: int,
    batch_size: int,
    patience: int,
    workers: int = 2,
    val_ratio: float = 0.2,
    seed: int = 42,
    dense_units: int = 256,
    dropout: float = 0.3,
) -> NotebookTimes:
    torch.manual_seed(seed)
    train, val, test, classes = _loaders(root, batch_size, workers, val_ratio, seed)
    model = torchvision.models.resnet18(weights=None)  # pretrained weights do not change timing
    for p in model.parameters():
        p.requires_grad_(False)
    model.fc = nn.Sequential(
        nn.Linear(512, dense_units), nn.ReLU(), nn.Dropout(dropout), nn.Linear(dense_units, classes)
    )
    start = time.perf_counter()
    ran1 = _fit(model, model.fc.parameters(), 1e-4, transfer_epochs, patience, train, val)
    _epoch(model, test)
    transfer_s = time.perf_counter() - start

    for p in model.layer4.parameters():
        p.requires_grad_(True)
    start = time.perf_counter()
    trainable = [p for p in model.parameters() if p.requires_grad]
    ran2 = _fit(model, trainable, 1e-5, finetune_epochs, patience, train, val)
    _epoch(model, test)
    finetune_s = time.perf_counter() - start
    return NotebookTimes(transfer_s, finetune_s, ran1, ran2)
