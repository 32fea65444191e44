"""Packing without padding: several tokenised examples share one row and never see each other.

Two ways to fill rows of ``max_length`` tokens:

- ``bfd`` (best-fit decreasing): examples sorted longest first, each put into the open row with the
  least room that still holds it whole. No example is cut unless it alone is longer than
  ``max_length`` (those are cut to ``max_length`` when tokenised). Rows end up nearly full.
- ``wrapped``: the examples concatenated into one stream that is cut into rows of exactly
  ``max_length`` tokens (the tail is dropped); an example may continue on the next row.

Either way each row keeps its sequence boundaries the padding-free way transformers understands:
``position_ids`` restart at 0 where an example (or the continued piece of one) starts, and no
``attention_mask`` is sent, so ``create_causal_mask`` (sdpa, eager, flex) turns the restarts into a
block-diagonal causal mask, and attention backends that read ``position_ids`` or ``cu_seq_lens_*``
(flash-attention varlen, ``hfx_sliding_window``) do the same. The first label of every piece is -100:
its token is never predicted from the previous example's last token, so the loss of a packed batch
is the token-weighted loss of its examples run one by one. :class:`PackedCollator` then lays a batch's
rows end to end in one row, so no padding is ever added.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .data import IGNORE_INDEX

#: examples best-fit together in one group (one ``datasets.map`` batch); larger groups fill rows no better
BFD_GROUP = 20_000


class _RoomIndex:
    """Open rows by free room, answering "the row with the least room >= n" in O(log capacity).

    A segment tree over room values 0..capacity counts the open rows with each room; the tightest
    fit is the leftmost non-empty leaf at or right of leaf n.
    """

    def __init__(self, capacity: int):
        self.size = 1
        while self.size < capacity + 1:
            self.size *= 2
        self.count = [0] * (2 * self.size)
        # rows of equal room are taken first-in first-out, as TRL's packer takes them: same rows as SFTTrainer
        self.rows: list[deque[int]] = [deque() for _ in range(self.size)]

    def _bump(self, room: int, delta: int) -> None:
        node = room + self.size
        while node:
            self.count[node] += delta
            node //= 2

    def add(self, room: int, row: int) -> None:
        self.rows[room].append(row)
        self._bump(room, 1)

    def take_tightest(self, need: int) -> tuple[int, int] | None:
        """(room, row) of an open row with the least room >= ``need``, removed from the index; None if none fits."""
        if need >= self.size:
            return None
        node = need + self.size
        if not self.count[node]:
            while node > 1:  # climb until a right sibling holds some room (every room there is > need)
                if node % 2 == 0 and self.count[node + 1]:
                    node += 1
                    break
                node //= 2
            else:
                return None
            while node < self.size:  # then the leftmost non-empty leaf below it
                node = 2 * node if self.count[2 * node] else 2 * node + 1
        room = node - self.size
        row = self.rows[room].popleft()
        self._bump(room, -1)
        return room, row


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into rows of at most ``capacity`` tokens, by best-fit decreasing.

    Ties keep the original order (a stable sort), so the result depends on the data alone.
    """
    too_long = [n for n in lengths if n > capacity or n <= 0]
    if too_long:
        raise ValueError(f"best_fit_decreasing: lengths must be in [1, {capacity}]; got {too_long[:5]}.")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    index = _RoomIndex(capacity)
    for i in order:
        found = index.take_tightest(lengths[i])
        if found is None:
            rows.append([])
            room, row = capacity, len(rows) - 1
        else:
            room, row = found
        rows[row].append(i)
        if room - lengths[i] > 0:
            index.add(room - lengths[i], row)
    return rows


def _piece(input_ids: list[int], labels: list[int]) -> tuple[list[int], list[int], list[int]]:
    """One example (or the continued part of one) as it sits in a row: positions from 0, first label -100."""
    return input_ids, [IGNORE_INDEX] + labels[1:], list(range(len(input_ids)))


def _rows(pieces_per_row) -> dict:
    out = {"input_ids": [], "labels": [], "position_ids": []}
    for pieces in pieces_per_row:
        ids, labels, positions = [], [], []
        for piece_ids, piece_labels in pieces:
            a, b, c = _piece(piece_ids, piece_labels)
            ids += a
            labels += b
            positions += c
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["position_ids"].append(positions)
    return out


def bfd_packer(max_length: int):
    """A ``datasets.map(batched=True)`` function packing each batch of examples by best-fit decreasing."""

    def pack(batch):
        lengths = [len(ids) for ids in batch["input_ids"]]
        rows = best_fit_decreasing(lengths, max_length)
        return _rows([[(batch["input_ids"][i], batch["labels"][i]) for i in row] for row in rows])

    return pack


def wrapped_packer(max_length: int):
    """A ``datasets.map(batched=True)`` function: the batch's examples end to end, cut into full rows of
    ``max_length`` (the tail shorter than a row is dropped); boundaries are kept inside each row."""

    def pack(batch):
        rows, current, room = [], [], max_length
        for ids, labels in zip(batch["input_ids"], batch["labels"]):
            start = 0
            while start < len(ids):
                take = min(room, len(ids) - start)
                current.append((ids[start : start + take], labels[start : start + take]))
                start += take
                room -= take
                if room == 0:
                    rows.append(current)
                    current, room = [], max_length
        return _rows(rows)

    return pack


def packing_efficiency(lengths, max_length: int) -> float:
    """Real tokens over the slots of the packed rows (rows x ``max_length``); 1.0 for no rows."""
    lengths = list(lengths)
    return sum(lengths) / (len(lengths) * max_length) if lengths else 1.0


@dataclass
class PackedCollator:
    """Flattens a batch of packed rows into ONE row without padding or attention mask (shape ``(1, tokens)``).

    The rows' pieces are laid end to end; each piece already starts at position 0 with label -100, so
    the boundaries hold across rows as they do inside one (the way ``DataCollatorWithFlattening`` and
    TRL's ``padding_free`` batch). No padding token exists anywhere in the batch, so the loss equals
    the examples' token-weighted loss even for models that pool over the tokens of a batch
    (``norm_type="batchnorm"`` statistics, ``ffn_type="moe"`` routing and its auxiliary loss), and
    Trainer's ``num_items_in_batch`` (the labelled tokens) is what it would be for the rows padded.
    ``use_cache=False`` goes with every batch (see the comment below). ``flash_attn_kwargs`` adds the
    varlen boundaries (``cu_seq_lens_q/k`` at each position restart, ``max_length_q/k``) that
    flash-attention kernels read instead of positions.
    """

    flash_attn_kwargs: bool = False

    def __call__(self, features: list[dict]) -> dict:
        import torch

        ids, labels, positions = [], [], []
        for f in features:
            ids += list(f["input_ids"])
            labels += list(f["labels"])
            positions += list(f["position_ids"])
        batch = {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            # transformers reads packing from position_ids only without a cache: a model whose config has
            # use_cache=True would build an empty DynamicCache even in training and attend across examples
            "use_cache": False,
        }
        if self.flash_attn_kwargs:
            flat = batch["position_ids"].view(-1)
            starts = torch.nonzero(flat == 0).view(-1)
            ends = torch.cat([starts[1:], torch.tensor([flat.numel()])])
            cu = torch.cat([starts, torch.tensor([flat.numel()])]).to(torch.int32)
            batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = cu
            batch["max_length_q"] = batch["max_length_k"] = int((ends - starts).max())
        return batch
