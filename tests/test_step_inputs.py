"""Persistent step inputs: exact rows, slots, query starts, tables and padding, on CPU."""

from __future__ import annotations

import pytest
import torch

from pagedserve.worker.step_inputs import StepChunk, StepInputs


def make_inputs(**kw) -> StepInputs:
    args = {"max_tokens": 32, "max_seqs": 8, "max_blocks": 4, "block_size": 4,
            "device": torch.device("cpu")}
    args.update(kw)
    return StepInputs(**args)


def test_decodes_then_chunks_fill_every_field():
    inputs = make_inputs()
    batch = inputs.prepare([
        StepChunk([11], 5, [7, 2], samples=True, is_decode=True),  # position 5: block 2, offset 1 -> slot 9
        StepChunk([12, 13, 14], 3, [1, 6], samples=True),  # positions 3, 4, 5
        StepChunk([15, 16], 0, [3], samples=False),  # mid-prefill: nothing sampled
    ])
    meta = batch.meta
    assert batch.input_ids.tolist() == [11, 12, 13, 14, 15, 16]
    assert batch.positions.tolist() == [5, 3, 4, 5, 0, 1]
    assert meta.slot_mapping.tolist() == [9, 7, 24, 25, 12, 13]
    assert meta.query_start_loc.tolist() == meta.query_start_loc_host == [0, 1, 4, 6]
    assert meta.seq_lens.tolist() == meta.seq_lens_host == [6, 6, 2]
    assert meta.block_tables[0, :2].tolist() == [7, 2]
    assert meta.block_tables[1, :2].tolist() == [1, 6]
    assert meta.block_tables[2, :1].tolist() == [3]
    assert (meta.num_decodes, meta.num_actual_tokens, meta.num_prefills) == (1, 6, 2)
    assert (meta.max_query_len, meta.max_seq_len) == (3, 6)
    assert batch.sample_rows.tolist() == [0, 3]
    assert not batch.samples_are_prefix


def test_padding_rows_write_nothing_and_read_nothing():
    inputs = make_inputs()
    batch = decodes = [StepChunk([21], 2, [5], True, is_decode=True),
               StepChunk([22], 1, [6], True, is_decode=True)]
    batch = inputs.prepare(decodes, pad_to=4)
    meta = batch.meta
    assert batch.num_rows == 4
    assert batch.input_ids.tolist() == [21, 22, 0, 0]
    assert meta.slot_mapping.tolist() == [22, 25, -1, -1]
    assert meta.seq_lens_host == [3, 2, 0, 0]
    assert meta.query_start_loc_host == [0, 1, 2, 3, 4]
    assert (meta.num_decodes, meta.num_actual_tokens) == (4, 2)
    assert batch.sample_rows.tolist() == [0, 1] and batch.samples_are_prefix


def test_buffers_are_reused_and_views_keep_their_address():
    inputs = make_inputs()
    first = inputs.prepare([StepChunk([1, 2, 3], 0, [0], True)])
    second = inputs.prepare([StepChunk([4], 3, [0], True, is_decode=True)])
    assert first.input_ids.data_ptr() == second.input_ids.data_ptr()
    assert second.meta.slot_mapping.data_ptr() == inputs.slot_mapping.data_ptr()
    assert second.input_ids.tolist() == [4]


def test_a_one_token_prompt_tail_attends_as_a_prefill_not_a_decode():
    inputs = make_inputs()
    batch = inputs.prepare([
        StepChunk([11], 5, [7, 2], True, is_decode=True),
        StepChunk([12], 4, [1, 6], True),  # the last prompt token, after a prefix-cache hit
    ])
    assert (batch.meta.num_decodes, batch.meta.num_prefills) == (1, 1)
    assert batch.meta.query_start_loc_host == [0, 1, 2]


def test_decodes_must_come_first_and_be_one_token():
    inputs = make_inputs()
    with pytest.raises(ValueError, match="^is_decode"):
        inputs.prepare([StepChunk([1, 2], 0, [0], True),
                        StepChunk([3], 2, [1], True, is_decode=True)])
    with pytest.raises(ValueError, match="^is_decode"):
        inputs.prepare([StepChunk([1, 2], 0, [0], True, is_decode=True)])


def test_fits_counts_padding():
    inputs = make_inputs(max_tokens=4, max_seqs=3)
    one = [StepChunk([1], 0, [0], True)]
    assert inputs.fits(one, pad_to=3)
    assert not inputs.fits(one, pad_to=4)
    assert not inputs.fits([StepChunk([1] * 5, 0, [0, 1], True)])


def test_table_rows_follow_growth_and_a_change_of_owner():
    """A row written for one request's table is topped up as the table grows, and rewritten
    whole when another request (another table) takes the row."""
    inputs = make_inputs()
    a, b = [3, 1], [6]
    first = inputs.prepare([StepChunk([1], 7, a, True, is_decode=True),
                            StepChunk([2], 2, b, True, is_decode=True)])
    assert first.meta.block_tables[0, :2].tolist() == [3, 1]
    a.append(5)  # the block manager appends as the request reaches position 8
    grown = inputs.prepare([StepChunk([4], 8, a, True, is_decode=True),
                            StepChunk([5], 3, b, True, is_decode=True)])
    assert grown.meta.block_tables[0, :3].tolist() == [3, 1, 5]
    assert grown.meta.slot_mapping.tolist() == [20, 27]
    swapped = inputs.prepare([StepChunk([6], 3, b, True, is_decode=True),
                              StepChunk([7], 1, [2], True, is_decode=True)])
    assert swapped.meta.block_tables[0, :1].tolist() == [6]
    assert swapped.meta.block_tables[1, :1].tolist() == [2]
    assert swapped.meta.slot_mapping.tolist() == [27, 9]
