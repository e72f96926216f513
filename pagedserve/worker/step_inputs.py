"""A step's inputs in persistent buffers: chunks -> token ids, positions, attention metadata.

Every per-step integer lives in one int32 buffer, in fixed regions, allocated once::

    [ input_ids | positions | slot_mapping ]             max_tokens each
    [ query_start_loc | seq_lens | sample_rows ]          max_seqs + 1, max_seqs, max_seqs
    [ feed_rows | feed_from ]                             max_seqs each
    [ block_tables: max_seqs rows x max_blocks ]          row i = request i of the step

A step writes the rows it uses on the host (numpy views, no tensor per field), then:

- on CUDA the host buffer is pinned and one non-blocking copy sends everything up to the
  step's last block-table row (a few tens of KB of header, then B x max_blocks ints);
- on CPU the host buffer *is* the device buffer: nothing is copied.

The device views never move, so a CUDA graph captured over them reads whatever the next fill
wrote.

A chunk whose last token is still on the device (overlapped steps: the previous step sampled
it and the host has not read it) names where: ``feed_from``, its row in the previous step's
sampled ids. The fill writes a placeholder id there and records (row of the step, row of the
previous ids) in ``feed_rows``/``feed_from``; the runner copies those ids in on the device
(:meth:`StepBatch.feed`) before the forward pass. Rows follow :mod:`pagedserve.ops.attention`: decode chunks first, then the others, then
padding up to ``pad_to`` requests (token 0, position 0, slot -1, seq_len 0: writes and reads no
KV). Before writing the host buffer, a fill waits for the previous step's copy to have left it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pagedserve.ops.attention import AttentionMetadata


@dataclass(slots=True)
class StepChunk:
    """One request's share of a step: its tokens at positions [start, start + len(token_ids))."""

    token_ids: list[int]
    start: int
    block_table: list[int]  # covers at least positions [0, start + len(token_ids))
    samples: bool  # the chunk ends at the request's last known token: sample after it
    # one sampled token, the input of a decode: attends on the decode path (rows [0, D)). A
    # one-token prompt tail is not one: it attends as a prefill chunk, as it would in a longer one
    is_decode: bool = False
    # >= 0: the last token's id is row `feed_from` of the previous step's sampled ids (device)
    feed_from: int = -1


@dataclass(slots=True)
class StepBatch:
    input_ids: torch.Tensor  # (T,) int32, T including padding
    positions: torch.Tensor  # (T,) int32
    meta: AttentionMetadata
    sample_rows: torch.Tensor  # (N,) int32: rows whose next token is sampled, in row order
    samples_are_prefix: bool  # sample_rows == [0, N): no gather needed
    feed_rows: torch.Tensor  # (F,) int32: rows whose input id comes from the device
    feed_from: torch.Tensor  # (F,) int32: where, in the previous step's sampled ids

    def feed(self, previous: torch.Tensor | None) -> None:
        """Copy the input ids still on the device into place (no host round trip)."""
        if self.feed_rows.shape[0]:
            assert previous is not None, "a chunk is fed from a previous step that is gone"
            ids = previous.index_select(0, self.feed_from).to(self.input_ids.dtype)
            self.input_ids.index_copy_(0, self.feed_rows.long(), ids)

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]


class StepInputs:
    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int, block_size: int,
                 device: torch.device):
        self.max_tokens, self.max_seqs, self.max_blocks = max_tokens, max_seqs, max_blocks
        self.block_size = block_size
        sizes = [max_tokens] * 3 + [max_seqs + 1] + [max_seqs] * 4 + [max_seqs * max_blocks]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        self._tables_offset = offsets[8]
        cuda = device.type == "cuda"
        self.host = torch.zeros(offsets[-1], dtype=torch.int32, pin_memory=cuda)
        self.device_buffer = self.host.to(device) if cuda else self.host
        self._copied = torch.cuda.Event() if cuda else None
        self._np = self.host.numpy()

        def regions(buf):
            return [buf[a:b] for a, b in zip(offsets, offsets[1:], strict=False)]

        (self._ids, self._pos, self._slots, self._qsl, self._lens, self._rows, self._feed_rows,
         self._feed_from, tables) = regions(self._np)
        self._tables = tables.reshape(max_seqs, max_blocks)
        # what each host table row holds: the block manager's own list for the request that
        # last used the row (tables only grow, by appending) and how much of it is written, so
        # a decode step writes only a new block id instead of every row again
        self._row_table: list[list[int] | None] = [None] * max_seqs
        self._row_written = [0] * max_seqs
        (self.input_ids, self.positions, self.slot_mapping, self.query_start_loc, self.seq_lens,
         self.sample_rows, self.feed_rows, self.feed_from, tables) = regions(self.device_buffer)
        self.block_tables = tables.view(max_seqs, max_blocks)

    def fits(self, chunks: list[StepChunk], pad_to: int = 0) -> bool:
        num_rows = sum(len(c.token_ids) for c in chunks) + max(0, pad_to - len(chunks))
        return num_rows <= self.max_tokens and max(len(chunks), pad_to) <= self.max_seqs

    def prepare(self, chunks: list[StepChunk], pad_to: int = 0) -> StepBatch:
        """Fill the buffers for `chunks` (decodes first) padded to `pad_to` requests."""
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy has read the host buffer
        bs = self.block_size
        ids, pos, slots, qsl, lens, tables = (self._ids, self._pos, self._slots, self._qsl,
                                              self._lens, self._tables)
        row = 0
        qsl[0] = 0
        num_decodes = max_query_len = max_seq_len = num_feeds = 0
        sample_rows: list[int] = []
        for i, c in enumerate(chunks):
            n = len(c.token_ids)
            end = c.start + n
            num_blocks = -(-end // bs)
            table = c.block_table
            if c.is_decode:
                if n != 1 or i != num_decodes:
                    raise ValueError("is_decode: a decode chunk has one token and comes first")
                num_decodes += 1
            if n == 1:
                ids[row] = c.token_ids[0]
                pos[row] = c.start
                slots[row] = table[c.start // bs] * bs + c.start % bs
            else:
                ids[row : row + n] = c.token_ids
                p = np.arange(c.start, end, dtype=np.int32)
                pos[row : row + n] = p
                slots[row : row + n] = np.asarray(table[:num_blocks], np.int32)[p // bs] * bs \
                    + p % bs
            if self._row_table[i] is not table:
                tables[i, :num_blocks] = table[:num_blocks]
                self._row_table[i], self._row_written[i] = table, num_blocks
            elif num_blocks > self._row_written[i]:
                written = self._row_written[i]
                tables[i, written:num_blocks] = table[written:num_blocks]
                self._row_written[i] = num_blocks
            row += n
            if c.feed_from >= 0:  # its id (PLACEHOLDER) is overwritten by StepBatch.feed
                self._feed_rows[num_feeds] = row - 1
                self._feed_from[num_feeds] = c.feed_from
                num_feeds += 1
            qsl[i + 1] = row
            lens[i] = end
            max_query_len = max(max_query_len, n)
            max_seq_len = max(max_seq_len, end)
            if c.samples:
                sample_rows.append(row - 1)
        num_actual = row
        num_requests = max(len(chunks), pad_to)
        num_pad = num_requests - len(chunks)
        if num_pad:  # one row each, attending to nothing and writing nothing
            ids[row : row + num_pad] = 0
            pos[row : row + num_pad] = 0
            slots[row : row + num_pad] = -1
            qsl[len(chunks) + 1 : num_requests + 1] = np.arange(row + 1, row + num_pad + 1)
            lens[len(chunks) : num_requests] = 0
            num_decodes += num_pad
            max_query_len = max(max_query_len, 1)
            row += num_pad
        self._rows[: len(sample_rows)] = sample_rows
        self._send(num_requests)
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:row],
            query_start_loc=self.query_start_loc[: num_requests + 1],
            seq_lens=self.seq_lens[:num_requests],
            block_tables=self.block_tables[:num_requests],
            num_decodes=num_decodes, num_actual_tokens=num_actual,
            max_query_len=max_query_len, max_seq_len=max_seq_len,
            query_start_loc_host=qsl[: num_requests + 1].tolist(),
            seq_lens_host=lens[:num_requests].tolist(), block_size=bs,
        )
        prefix = sample_rows == list(range(len(sample_rows)))
        return StepBatch(self.input_ids[:row], self.positions[:row], meta,
                         self.sample_rows[: len(sample_rows)], prefix,
                         self.feed_rows[:num_feeds], self.feed_from[:num_feeds])

    def _send(self, num_requests: int) -> None:
        if self._copied is None:
            return
        n = self._tables_offset + num_requests * self.max_blocks
        self.device_buffer[:n].copy_(self.host[:n], non_blocking=True)
        self._copied.record()
