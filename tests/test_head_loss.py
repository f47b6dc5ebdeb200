"""The head's loss a block of the vocabulary at a time: the same cross-entropy, with the text's labels or with
labels the model draws."""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from lora_compress.calibrate import head_loss


def test_the_head_loss_a_block_of_the_vocabulary_at_a_time_is_cross_entropy(monkeypatch):
    monkeypatch.setattr(head_loss, "VOCAB_BLOCK", 7)  # 50 words in 8 blocks
    monkeypatch.setattr(head_loss, "BLOCK_ELEMENTS", 7 * 3)  # 3 rows at a time
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(12, 50)
    features = torch.randn(2, 9, 12, generator=g, requires_grad=True)  # (B, T, C)
    ids = torch.randint(0, 50, (2, 9), generator=g)
    loss = head_loss.next_token_loss(features, head, ids)
    loss.backward()
    got = features.grad.clone()
    features.grad = None
    expected = F.cross_entropy(head(features[:, :-1]).flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(got, features.grad, rtol=1e-4, atol=1e-6)


def test_the_head_loss_draws_its_labels_from_the_model_a_block_at_a_time(monkeypatch):
    monkeypatch.setattr(head_loss, "VOCAB_BLOCK", 7)
    monkeypatch.setattr(head_loss, "BLOCK_ELEMENTS", 7 * 3)
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(12, 50, bias=False)
    features = torch.randn(2, 9, 12, generator=g, requires_grad=True)
    with torch.no_grad():
        head.weight.copy_(torch.randn(50, 12, generator=g))  # seeded here: not the global RNG's state
        sure = head(features).argmax(-1)  # (2, 9): made near-certain by scaling the head up
        head.weight.mul_(200)
    ids = torch.randint(0, 50, (2, 9), generator=g)  # the text disagrees
    drawn = head_loss.next_token_loss(features, head, ids, torch.Generator().manual_seed(1))
    drawn.backward()
    expected = F.cross_entropy(head(features[:, :-1]).flatten(0, 1), sure[:, :-1].flatten(), reduction="sum")
    assert drawn.item() == pytest.approx(expected.item(), abs=1e-3)
    text = head_loss.next_token_loss(features, head, ids)
    assert text.item() > drawn.item() + 100  # the text's labels are far less likely
