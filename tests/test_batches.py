"""The leaf's token batches: the pad-id rule, right padding, teacher-forced rows."""

import types

import pytest
import torch

from factedit.batches import IGNORE_INDEX, labelled_batch, pad_id, right_pad, start_id, teacher_forced


def test_pad_id_prefers_the_pad_token_then_end_of_sequence():
    assert pad_id(types.SimpleNamespace(pad_token_id=3, eos_token_id=7)) == 3
    assert pad_id(types.SimpleNamespace(pad_token_id=0, eos_token_id=7)) == 0  # 0 is a token id, not "missing"
    assert pad_id(types.SimpleNamespace(pad_token_id=None, eos_token_id=7)) == 7
    with pytest.raises(ValueError, match="neither a pad token nor an end-of-sequence token"):
        pad_id(types.SimpleNamespace(pad_token_id=None, eos_token_id=None))


def test_start_id_prefers_beginning_of_sequence_then_end():
    assert start_id(types.SimpleNamespace(bos_token_id=1, eos_token_id=2)) == 1
    assert start_id(types.SimpleNamespace(bos_token_id=None, eos_token_id=2)) == 2
    with pytest.raises(ValueError, match="neither a BOS nor an EOS"):
        start_id(types.SimpleNamespace(bos_token_id=None, eos_token_id=None))


def test_right_pad_puts_the_sequences_left_and_masks_the_rest():
    ids, mask = right_pad([[5, 6, 7], [8]], pad=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long


def test_long_pairs_lose_the_start_of_the_prompt():
    ids, labels = teacher_forced([1, 2, 3, 4, 5], [8, 9], max_length=4)
    assert ids == [4, 5, 8, 9] and labels == [IGNORE_INDEX, IGNORE_INDEX, 8, 9]
    ids, labels = teacher_forced([1, 2], [7, 8, 9], max_length=3)
    assert ids == [2, 7, 8] and labels == [IGNORE_INDEX, 7, 8]
    assert teacher_forced([1, 2], [3]) == ([1, 2, 3], [IGNORE_INDEX, IGNORE_INDEX, 3])


def test_labelled_batch_labels_only_the_targets():
    batch = labelled_batch([teacher_forced([1, 2], [3]), teacher_forced([4], [5, 6, 7])], pad=9)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 9], [4, 5, 6, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 3, IGNORE_INDEX], [IGNORE_INDEX, 5, 6, 7]]


def test_pack_keeps_groups_whole_and_in_order():
    from factedit.batches import pack

    groups = [[1, 2], [3], [4, 5, 6, 7, 8], [9], [10, 11]]
    assert pack(groups, 3) == [[[1, 2], [3]], [[4, 5, 6, 7, 8]], [[9], [10, 11]]]
    assert pack([], 3) == []
