"""The official FedRep Sent140 network (``models/Nets.py`` ``RNNSent``, built in
``utils/train_utils.py`` as ``RNNSent(args, 'LSTM', 2, 25, 128, 1, 0.5)``).

Frozen 300-d GloVe word vectors -> one LSTM layer (128 hidden) -> fc 10 -> ReLU -> dropout 0.5
-> decoder 2 (sentiment). Representation = the LSTM and fc (official Sent140 ``w_glob_keys`` =
state-dict keys 0..5: the four LSTM tensors, fc.weight, fc.bias); head = the decoder. Initial
weights follow ``RNNSent.init_weights``: fc and decoder uniform in [-0.1, 0.1], biases zero.

The frozen embedding lookup happens in the data pipeline (``fedrep.data.federated``): a client's
samples arrive as (n, 25, 300) word vectors, so the 400,000-word table is neither a parameter nor
sent anywhere, which is what "frozen" means in the official code (a plain tensor, not a
parameter).

Input layout. The official forward builds a (25 words, batch, 300) tensor and then calls
``emb.view(300, batch, 25)``: that *reinterprets* the memory, so the LSTM (input size 25) reads
300 steps of 25 numbers that mix words and, for batch > 1, samples. ``input_layout="words"``
(default) feeds what the paper describes, 25 steps of 300-d word vectors (LSTM input size 300);
``"official-view"`` reproduces the official reinterpretation exactly, for like-for-like reruns.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from fedrep.models.base import SplitModel

InputLayout = Literal["words", "official-view"]
EMBED_DIM, HIDDEN, FC = 300, 128, 10


class _LstmBody(nn.Module):
    """LSTM over the sequence, then fc -> ReLU -> dropout on the last step's output (the official
    code applies fc to every step and keeps the last; fc is per-step, so the result is the same)."""

    def __init__(self, layout: InputLayout, max_words: int) -> None:
        super().__init__()
        self.layout, self.max_words = layout, max_words
        self.rnn = nn.LSTM(max_words if layout == "official-view" else EMBED_DIM, HIDDEN, 1)
        self.fc = nn.Linear(HIDDEN, FC)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, words, 300)
        steps = x.float().transpose(0, 1).contiguous()  # (words, batch, 300), as the official emb
        if self.layout == "official-view":
            steps = steps.view(EMBED_DIM, steps.shape[1], self.max_words)
        output, _ = self.rnn(steps)
        return self.drop(torch.relu(self.fc(output[-1])))


class Sent140LSTM(SplitModel):
    def __init__(self, num_classes: int = 2, layout: InputLayout = "words", max_words: int = 25) -> None:
        head = nn.Linear(FC, num_classes)
        super().__init__(_LstmBody(layout, max_words), head)
        with torch.no_grad():
            for layer in (self.body.fc, head):
                layer.weight.uniform_(-0.1, 0.1)
                layer.bias.zero_()
