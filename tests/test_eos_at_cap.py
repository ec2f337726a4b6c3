"""sampling.eos_at_cap: capped on-policy samples end in EOS (PromptKD's reference), GKD's do not."""

from __future__ import annotations

import pytest
import torch
from test_methods import trainer_for
from test_sampling import check_invariants, run_scripted

from promptkd.sampling import SamplingConfig


def test_capped_rows_get_eos_as_their_last_token_and_ended_rows_are_untouched():
    prompts = [[4, 5], [6], [7, 7]]
    script = [[7, 8, 9, 9], [9, 2, 8], [8, 8, 8, 2]]  # row 0 capped, row 1 ends, row 2 ends at the cap
    batch, _, _, mask = run_scripted(prompts, script, eos=[2, 3], pad=0, max_new_tokens=4, eos_at_cap=True)
    assert torch.equal(batch.input_ids[:, 2:], torch.tensor([[7, 8, 9, 2], [9, 2, 0, 0], [8, 8, 8, 2]]))
    assert torch.equal(batch.loss_mask[:, 2:], torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]]).bool())
    check_invariants(batch, mask)


def test_without_eos_at_cap_capped_rows_keep_their_sampled_tokens():
    batch, _, _, _ = run_scripted([[4, 5]], [[7, 8, 9]], eos=2, pad=0, max_new_tokens=4)
    assert torch.equal(batch.input_ids[:, 2:], torch.tensor([[7, 8, 9, 9]]))


@pytest.mark.parametrize(
    "method, setting, expected",
    [("promptkd", None, True), ("gkd", None, False), ("promptkd", False, False), ("gkd", True, True)],
)
def test_the_method_default_applies_to_student_training_samples_only(
    tmp_path, tiny_pair_dirs, tiny_jsonl, monkeypatch, method, setting, expected
):
    tr = trainer_for(tmp_path, tiny_pair_dirs, tiny_jsonl, method, sampling={"eos_at_cap": setting})
    seen = []
    real = tr.ctx.sampler

    def spy(model, ids, mask, *, config, **kw):
        seen.append(config.eos_at_cap)
        return real(model, ids, mask, config=config, **kw)

    monkeypatch.setattr(tr.ctx, "sampler", spy)
    examples = tr.train_examples[:2]
    tr.ctx.sample(examples)
    tr.ctx.sample(examples, from_teacher=True)
    tr.ctx.sample(examples, training=False)
    assert seen == [expected, False, False]


def test_section_default_is_null_and_resolves_to_the_given_default():
    s = SamplingConfig()
    assert s.eos_at_cap is None
    assert s.to_sampling_config(True).eos_at_cap is True
    assert s.to_sampling_config().eos_at_cap is False
