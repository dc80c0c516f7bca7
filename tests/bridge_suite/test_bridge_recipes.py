"""Every Bridge recipe builder, fed the tiny models, gives a ConfigContainer Bridge accepts, with the
checkpoint's vocabulary at every TP, resume and stop-signal settings, and the criterion hook checked."""

from __future__ import annotations

import json

from conftest import shimmed_python
from tiny import VOCAB

BUILD = """
import json, sys
from recipes import StageFiles, resolve
from nemo_paced.overrides import apply_overrides
files = StageFiles(init={student!r}, teacher={teacher!r}, problems={problems!r}, references={references!r},
                   service="http://127.0.0.1:9", out={out!r})
"""


def test_recipes_build_and_keep_the_checkpoint_vocabulary_at_every_tp(tiny_models, stage_inputs, tmp_path):
    code = BUILD.format(student=str(tiny_models.student), teacher=str(tiny_models.teacher),
                        problems=str(stage_inputs.problems), references=str(stage_inputs.references),
                        out=str(tmp_path / "out")) + """
from megatron.bridge.training.setup import _validate_and_set_vocab_size
from megatron.core.utils import get_model_config
result = {}
for name, shrink in (("qwen3_8b_to_1p7b", []),
                     ("qwen3_235b_a22b_to_8b", ["model.pipeline_model_parallel_size=1",
                                                "model.num_layers_in_first_pipeline_stage=null",
                                                "model.num_layers_in_last_pipeline_stage=null"])):
    for stage in ("fkl", "rkl"):
        config = apply_overrides(resolve(name)(stage=stage, files=files), shrink)
        sizes = {}
        for tp in (1, 2, 4, 8):
            # what setup.py:295 and gpt_provider.py:265 make of the vocabulary (17-token tokenizer)
            vocab, pad = _validate_and_set_vocab_size(config.model.vocab_size, 17,
                                                      config.tokenizer.use_tokenizer_vocab_size)
            for provider in (config.model, config.model.teacher):
                padded = vocab
                if pad or provider.should_pad_vocab:
                    from megatron.bridge.models.gpt_provider import calculate_padded_vocab_size
                    padded = calculate_padded_vocab_size(vocab, provider.make_vocab_size_divisible_by, tp)
                sizes.setdefault(tp, []).append(padded)
        result[name + "/" + stage] = dict(
            sizes=sizes, teacher_vocab=config.model.teacher.vocab_size, load=config.checkpoint.load,
            save=config.checkpoint.save, signal_handler=config.train.exit_signal_handler,
            hooks=[getattr(h, "__name__", "") for h in config.model._pre_wrap_hooks][-2:],
            iters=config.train.train_iters)
print(json.dumps(result))
"""
    result = json.loads(shimmed_python(code).strip().splitlines()[-1])
    assert set(result) == {f"{n}/{s}" for n in ("qwen3_8b_to_1p7b", "qwen3_235b_a22b_to_8b") for s in ("fkl", "rkl")}
    for name, built in result.items():
        # Bug 1: the checkpoint's 320 rows at every TP, teacher and student (before the fix:
        # 17 padded to 256 at TP=2, fewer rows than the checkpoint; 512 at TP=4, dummy logits)
        assert built["sizes"] == {str(tp): [VOCAB, VOCAB] for tp in (1, 2, 4, 8)}, name
        assert built["teacher_vocab"] == VOCAB
        # Bug 2: a requeued job loads from where it saved
        stage = name.rsplit("/", 1)[1]
        assert built["load"] == built["save"] == str(tmp_path / "out" / "checkpoints"), name
        # Bug 3: stop signals end the stage with a checkpoint
        assert built["signal_handler"] is True
        assert built["hooks"] == ["install_criterion", "_convert_hook"]
        assert built["iters"] == 1000 and stage in name


def test_a_provider_whose_last_hook_is_not_modelopts_conversion_is_refused(tiny_models):
    # Finding 4: the criterion hook went before hooks[-1] whatever that was; now it must be the convert hook.
    code = """
from megatron.bridge.models.gpt_provider import GPTModelProvider
import nemo_paced.megatron.bridge as bridge
convert = bridge.convert_to_distillation_provider
def convert_then_append(student, teacher, kd_config):
    provider = convert(student, teacher, kd_config)
    object.__setattr__(provider, "_pre_wrap_hooks", [*provider._pre_wrap_hooks, lambda chunks: chunks])
    return provider
def tiny():
    return GPTModelProvider(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=128, seq_length=32)
names = [h.__name__ for h in bridge.paced_distillation_provider(tiny(), tiny(), "fkl")._pre_wrap_hooks[-2:]]
assert names == ["install_criterion", "_convert_hook"], names
bridge.convert_to_distillation_provider = convert_then_append
try:
    bridge.paced_distillation_provider(tiny(), tiny(), "fkl")
except RuntimeError as error:
    print("refused:", error)
"""
    out = shimmed_python(code)
    assert "refused: the last pre-wrap hook of Bridge's distillation provider is not its ModelOpt convert hook" in out
