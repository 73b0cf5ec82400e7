"""The CausalLM wrapper: cache crop and custom masks reproduce fresh forward passes."""

from __future__ import annotations

import torch


def test_crop_then_extend_equals_fresh_forward(zoo_models, zoo_prompts):
    models, _ = zoo_models
    target = models.target
    ids = zoo_prompts[0][:20]
    continuation = [5, 17, 42, 99, 7]
    target.prefill(ids)
    target.extend(continuation)             # go 5 tokens ahead...
    target.crop(len(ids) + 2)               # ...roll back to keep only 2 of them
    after_crop = target.extend([11, 12]).logits
    fresh = target.prefill(ids + continuation[:2] + [11, 12], all_logits=True).logits[-2:]
    assert target.length == len(ids) + 4
    torch.testing.assert_close(after_crop, fresh, rtol=1e-4, atol=1e-4)


def test_crop_refuses_to_grow(zoo_models, zoo_prompts):
    models, _ = zoo_models
    target = models.target
    target.prefill(zoo_prompts[0][:10])
    try:
        target.crop(11)
    except ValueError as error:
        assert "cannot crop" in str(error)
    else:
        raise AssertionError("crop beyond the cached length must fail")


def test_custom_causal_mask_matches_default(zoo_models, zoo_prompts):
    """An explicit causal mask and positions give the same logits as the default path (tree verification's base)."""
    models, _ = zoo_models
    target = models.target
    ids = zoo_prompts[1][:12]
    new = [3, 4, 5]
    target.prefill(ids)
    default = target.extend(new).logits
    target.crop(len(ids))
    past = len(ids)
    mask = torch.ones(len(new), past + len(new), dtype=torch.bool)
    mask[:, past:] = torch.tril(torch.ones(len(new), len(new), dtype=torch.bool))
    explicit = target.extend(new, attention_mask=mask, position_ids=torch.arange(past, past + len(new))).logits
    torch.testing.assert_close(default, explicit, rtol=1e-4, atol=1e-4)


def test_forward_counts(zoo_models, zoo_prompts):
    models, _ = zoo_models
    target = models.target
    target.reset_stats()
    target.prefill(zoo_prompts[0][:8])
    target.extend([1])
    target.extend([2, 3])
    stats = target.reset_stats()
    assert (stats.prefill_calls, stats.decode_calls, stats.decode_tokens, stats.calls) == (1, 2, 3, 3)


def test_timing_a_forward_leaves_the_sequence_cache_and_counts_as_they_were(zoo_models, zoo_prompts):
    models, _ = zoo_models
    target = models.target
    ids = zoo_prompts[0][:15]
    target.prefill(ids)
    before = target.stats.as_dict()
    seconds = target.time_steps([1, 4, 2], context=16, repeats=3)
    assert len(seconds) == 3 and min(seconds) > 0
    assert target.length == len(ids) and target.stats.as_dict() == before
    after_timing = target.extend([5, 6]).logits
    torch.testing.assert_close(after_timing, target.prefill(ids + [5, 6], all_logits=True).logits[-2:],
                               rtol=1e-4, atol=1e-4)
