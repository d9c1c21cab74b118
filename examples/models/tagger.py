"""A token tagger: int64 token ids and a bool mask in, a dict of tensors out."""

import torch
from torch import nn


class Tagger(nn.Module):
    def __init__(self, vocab: int = 100, width: int = 32, tags: int = 5):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, tags)

    def forward(self, input_ids, mask):
        h = torch.relu(self.mix(self.embed(input_ids))) * mask.unsqueeze(-1)
        return {"logits": self.head(h), "pooled": h.sum(1)}


def build(vocab: int = 100, width: int = 32, tags: int = 5) -> Tagger:
    return Tagger(vocab, width, tags)
