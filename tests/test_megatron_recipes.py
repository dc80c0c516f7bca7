"""Recipe registry, the `nemo-paced train` command, and the documented H100 layouts."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from recipes import RECIPES, UnknownRecipe, resolve
from recipes.frontier import STUDENT_LAYOUT
from recipes.qwen2p5_math import SELF_LAYOUT
from recipes.qwen3 import FRONTIER_LAYOUT, PAIR_LAYOUT, Layout

HAS_BRIDGE = importlib.util.find_spec("megatron.bridge") is not None


def test_help_lists_every_recipe_and_stage():
    out = subprocess.run([sys.executable, "-m", "nemo_paced", "train", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for name, recipe in RECIPES.items():
        assert name in out and recipe.summary[:30] in out
    assert "fkl" in out and "rkl" in out and "KEY=VALUE" in out


def test_unknown_recipe_is_a_clear_error():
    result = subprocess.run([sys.executable, "-m", "nemo_paced", "train", "--recipe", "qwen9", "--stage", "fkl"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "unknown recipe 'qwen9'; known: tiny_cpu, qwen3_8b_to_1p7b" in result.stderr
    with pytest.raises(UnknownRecipe, match="has no function 'nope'"):
        resolve("recipes.qwen3:nope")
    with pytest.raises(UnknownRecipe, match="no module 'recipes.nowhere'"):
        resolve("recipes.nowhere:f")


def test_bridge_recipes_resolve_by_name_and_path():
    for name in ("qwen3_8b_to_1p7b", "qwen3_235b_a22b_to_8b"):
        function = resolve(name)
        assert function is resolve(RECIPES[name].path) and function.__module__ == "recipes.qwen3"


@pytest.mark.skipif(HAS_BRIDGE, reason="checks the message shown where Megatron Bridge is missing")
def test_bridge_recipe_without_bridge_names_the_missing_package():
    with pytest.raises(ImportError, match="needs Megatron Bridge"):
        resolve("qwen3_8b_to_1p7b")(stage="fkl")


# Shapes of the Hugging Face checkpoints (config.json of Qwen/Qwen3-1.7B, -8B, -235B-A22B).
QWEN3_1P7B = dict(num_layers=28, hidden_size=2048, num_attention_heads=16, num_query_groups=8, ffn_hidden_size=6144)
QWEN3_8B = dict(num_layers=36, hidden_size=4096, num_attention_heads=32, num_query_groups=8, ffn_hidden_size=12288)
QWEN3_235B = dict(num_layers=94, hidden_size=4096, num_attention_heads=64, num_query_groups=4, ffn_hidden_size=12288,
                  num_moe_experts=128, moe_router_topk=8, moe_ffn_hidden_size=1536)


def _checked(shape: dict, layout: Layout, stage_layers):
    """Apply the layout to a real megatron-core config and let its validation run."""
    from megatron.core.transformer import TransformerConfig

    import torch

    config = TransformerConfig(**shape, kv_channels=128, add_bias_linear=False, bf16=True,
                               pipeline_dtype=torch.bfloat16)
    layout.apply(config, stage_layers)
    config.__post_init__()  # megatron-core's own checks of the parallel layout
    return config


@pytest.mark.parametrize("layout,student,teacher", [
    (PAIR_LAYOUT, QWEN3_1P7B, QWEN3_8B),
    (FRONTIER_LAYOUT, QWEN3_8B, QWEN3_235B),
], ids=["qwen3_8b_to_1p7b", "qwen3_235b_a22b_to_8b"])
def test_documented_layouts_pass_megatron_validation(layout, student, teacher):
    s = _checked(student, layout, layout.student_stage_layers)
    t = _checked(teacher, layout, layout.teacher_stage_layers)
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"):
        assert getattr(s, name) == getattr(t, name)
    assert s.context_parallel_size == 1 and s.virtual_pipeline_model_parallel_size is None
    for config in (s, t):  # attention splits whole key/value groups over tensor-parallel ranks
        assert config.num_query_groups % config.tensor_model_parallel_size == 0
    if t.num_moe_experts:
        assert t.expert_model_parallel_size == 1 and t.expert_tensor_parallel_size == t.tensor_model_parallel_size
    for config, stages in ((s, layout.student_stage_layers), (t, layout.teacher_stage_layers)):
        pp = config.pipeline_model_parallel_size
        if stages:
            middle = config.num_layers - sum(stages)
            assert middle % (pp - 2) == 0
        else:
            assert config.num_layers % pp == 0


def test_tiny_cpu_recipe_builds_with_overrides():
    result = subprocess.run([sys.executable, "-m", "nemo_paced", "train", "--recipe", "tiny_cpu", "--stage", "rkl",
                             "--print-config", "schedule.total_steps=10", "lr=0.01", "weighting.mode=sample"],
                            capture_output=True, text=True, check=True)
    config = json.loads(result.stdout)  # --print-config prints the final config as JSON
    assert config["student"] == "runs/tiny/fkl/final" and config["schedule"]["total_steps"] == 10
    assert config["lr"] == 0.01 and config["weighting"]["mode"] == "sample"
    bad = subprocess.run([sys.executable, "-m", "nemo_paced", "train", "--recipe", "tiny_cpu", "--stage", "fkl",
                          "schedule.total_step=10"], capture_output=True, text=True)
    assert bad.returncode == 2 and "did you mean schedule.total_steps" in bad.stderr


def test_the_stage_files_reach_the_recipe_config_and_overrides_apply_after():
    files = ["--init", "/w/stage1/final", "--teacher", "/m/t", "--problems", "/d/p.jsonl", "--references", "/w/r.jsonl",
             "--passrates", "/w/pr.jsonl", "--service", "/w/addr", "--out", "/w/stage2", "--split", "0.8",
             "--teacher-cache", "/w/tcache", "--teacher-service", "/w/teacher.addr"]
    config = json.loads(subprocess.run([sys.executable, "-m", "nemo_paced", "train", "--recipe", "tiny_cpu", "--stage",
                                        "rkl", "--print-config", *files, "rollout=http://h:1"], capture_output=True,
                                       text=True, check=True).stdout)
    expected = {"student": "/w/stage1/final", "teacher": "/m/t", "problems": "/d/p.jsonl", "references": "/w/r.jsonl",
                "passrates": "/w/pr.jsonl", "out_dir": "/w/stage2", "rollout": "http://h:1",
                "teacher_cache": "/w/tcache", "teacher_service": "/w/teacher.addr"}
    assert {k: config[k] for k in expected} == expected
    assert config["schedule"]["fkl_fraction"] == 0.8  # one schedule over both stages; rkl runs its last 20 %
    bad = subprocess.run([sys.executable, "-m", "nemo_paced", "train", "--recipe", "tiny_cpu", "--stage", "fkl",
                          "--split", "1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "split must lie strictly between 0 and 1" in bad.stderr


QWEN2P5_MATH_7B = dict(num_layers=28, hidden_size=3584, num_attention_heads=28, num_query_groups=4,
                       ffn_hidden_size=18944)


@pytest.mark.parametrize("layout,student", [
    (SELF_LAYOUT, QWEN2P5_MATH_7B),
    (STUDENT_LAYOUT, QWEN3_8B),
], ids=["qwen2p5_math_7b_self", "qwen3_235b_a22b_served_to_8b"])
def test_student_only_layouts_pass_megatron_validation(layout, student):
    """The self-distillation and served-teacher recipes hold only the student: its layout alone must validate."""
    config = _checked(student, layout, layout.student_stage_layers)
    assert config.num_query_groups % config.tensor_model_parallel_size == 0
    assert config.num_layers % config.pipeline_model_parallel_size == 0 and config.context_parallel_size == 1
