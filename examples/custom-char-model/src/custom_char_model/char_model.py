"""The shipped example of a custom backbone: a character model and a sequence task.

The model reads three characters through the same two layers, one character
at a time, the way the classic Char3SeqModel does; a new `head` turns its
features into class logits. `custom_model` and `custom_data` in
.copier-answers.yml point at `build_model` and `datasets` here. Replace them
with your own factories: any nn.Module and any (train, val) datasets of
(input, label) pairs get the same freeze, BatchNorm, load and export code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

VOCAB = 64
LENGTH = 3


class Char3SeqModel(nn.Module):
    def __init__(self, num_classes: int, vocab: int = VOCAB, n_fac: int = 16, n_hidden: int = 64) -> None:
        super().__init__()
        self.em = nn.Embedding(vocab, n_fac)
        self.fc1 = nn.Linear(n_fac, n_hidden)  # character -> hidden
        self.fc2 = nn.Linear(n_hidden, n_hidden)  # hidden -> hidden, between characters
        self.fc3 = nn.Linear(n_hidden, n_hidden)  # last hidden -> features
        self.head = nn.Linear(n_hidden, num_classes)

    def forward(self, chars: Tensor) -> Tensor:
        """`chars`: (batch, LENGTH) character ids."""
        hidden = chars.new_zeros(chars.shape[0], self.fc2.in_features, dtype=self.fc2.weight.dtype)
        for char in chars.unbind(1):
            hidden = torch.tanh(self.fc2(hidden + F.relu(self.fc1(self.em(char)))))
        return self.head(F.relu(self.fc3(hidden)))


def build_model(num_classes: int) -> nn.Module:
    return Char3SeqModel(num_classes)


def datasets(num_classes: int, train_size: int = 2048, val_size: int = 512, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Sequences whose characters come mostly from their class's own 8 characters.

    Each position takes one of the class's characters with probability 0.7,
    else any character, so a sequence can mislead and accuracy stays below 1.
    """
    generator = torch.Generator().manual_seed(seed)
    alphabets = torch.stack([torch.randperm(VOCAB, generator=generator)[:8] for _ in range(num_classes)])

    def sample(size: int) -> TensorDataset:
        labels = torch.arange(size) % num_classes
        own = alphabets[labels[:, None], torch.randint(8, (size, LENGTH), generator=generator)]
        other = torch.randint(VOCAB, (size, LENGTH), generator=generator)
        keep = torch.rand(size, LENGTH, generator=generator) < 0.7
        return TensorDataset(torch.where(keep, own, other), labels)

    return sample(train_size), sample(val_size)
