"""Megatron Bridge glue; runs only where Megatron Bridge is installed (NeMo Framework containers)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.bridge
pytest.importorskip("megatron.bridge", reason="needs megatron-bridge, which does not install on CPU-only machines")


def tiny_provider(vocab: int = 128):
    from megatron.bridge.models.gpt_provider import GPTModelProvider

    return GPTModelProvider(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=vocab, seq_length=32)


def test_provider_installs_the_paced_criterion_right_before_modelopt_conversion():
    from nemo_paced.megatron.bridge import paced_distillation_provider

    provider = paced_distillation_provider(tiny_provider(), tiny_provider(), "rkl")
    names = [getattr(hook, "__name__", "") for hook in provider._pre_wrap_hooks]
    assert names[-2:] == ["install_criterion", "_convert_hook"]
    assert provider.calculate_per_token_loss and provider.kd_config.criterion is None  # set at conversion time
    teacher_hooks = getattr(provider.teacher, "_pre_wrap_hooks", [])
    assert "install_criterion" not in [getattr(hook, "__name__", "") for hook in teacher_hooks]


def test_provider_rejects_a_teacher_with_another_vocabulary():
    from nemo_paced.megatron.bridge import paced_distillation_provider
    from nemo_paced.megatron.teacher import TeacherMismatchError

    with pytest.raises(TeacherMismatchError, match="vocabulary sizes differ"):
        paced_distillation_provider(tiny_provider(128), tiny_provider(256), "fkl")
