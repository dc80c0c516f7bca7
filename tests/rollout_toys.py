"""Shared pieces of the rollout tests: a tiny random GPT-2 over the demo's character tokenizer, toy
problems, a verifier whose pass rate under a model can be computed exactly, and the service as a
subprocess.

`first_char_in` accepts a completion whose first character is one of the answer's characters, so a
problem's pass rate at temperature 1 is the model's next-token probability mass on those characters
right after the prompt: one forward pass gives the exact expected value of the estimate.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from nemo_paced.rollout.client import RolloutClient

TESTS = Path(__file__).parent

ALPHABET = "0123456789+-.="


def save_tiny_model(path, seed: int = 0, hidden: int = 32, layers: int = 2):
    """A randomly initialised GPT-2 (eval mode) and its tokenizer, saved to `path`; returns the model."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from nemo_paced.tasks.tokenizer import char_tokenizer

    tokenizer = char_tokenizer(ALPHABET)
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=hidden, n_layer=layers, n_head=2,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # sharpen the output so pass rates spread out instead of all being ~ size/17
        model.transformer.wte.weight.mul_(6)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def save_broken_checkpoints(model_dir: Path, root: Path) -> dict[str, tuple[Path, str]]:
    """Copies of a saved tiny model, each broken one way: name -> (directory, a text the refusal must
    contain). Nothing but `truncated` and `corrupt` is unreadable; the rest load with a warning."""
    import shutil

    from safetensors.torch import load_file, save_file

    weights = load_file(model_dir / "model.safetensors")
    keys = sorted(weights)
    broken = {}

    def variant(name: str, tensors: dict | None = None, raw: bytes | None = None):
        path = root / name
        shutil.copytree(model_dir, path)
        if raw is not None:
            (path / "model.safetensors").write_bytes(raw)
        else:
            save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
        return path

    half = keys[: len(keys) // 2]
    broken["missing"] = (variant("missing", {k: weights[k] for k in half}), keys[len(keys) // 2])
    broken["unexpected"] = (variant("unexpected", {**weights, "transformer.bogus.weight": torch.zeros(3)}),
                            "transformer.bogus.weight")
    bias = "transformer.h.0.mlp.c_fc.bias"
    broken["shape"] = (variant("shape", {**weights, bias: torch.zeros(7)}), bias)
    broken["corrupt"] = (variant("corrupt", raw=b"\x10\x00\x00\x00\x00\x00\x00\x00not a header"), "SafetensorError")
    raw = (model_dir / "model.safetensors").read_bytes()
    broken["truncated"] = (variant("truncated", raw=raw[: len(raw) // 2]), "SafetensorError")
    other = save_tiny_model(root / "wider", seed=2, hidden=48)
    del other
    broken["wider"] = (root / "wider", "differing from the served model")
    return broken


# (id, prompt, accepted first characters); "#" is outside the alphabet, so that problem's pass rate is 0.
TOY_PROBLEMS = [("none", "12+34=", "#"), ("digits", "5-6=", "0123456789"), ("ops", "77+1-2=", "+-.="),
                ("low", "=", "9"), ("mid", "3+3+3=", "01234"), ("all", "88-8=", ALPHABET)]


def toy_problems():
    from nemo_paced.problems import Problem

    return [Problem(i, prompt, answer) for i, prompt, answer in TOY_PROBLEMS]


def first_char_in(completion: str, answer: str) -> bool:
    return bool(completion) and completion[0] in answer


def teacher_forced_logprobs(model, prompt_ids, token_ids) -> torch.Tensor:
    ids = torch.tensor([list(prompt_ids) + list(token_ids)])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits.float(), -1)[0, len(prompt_ids) - 1:-1]
    return logprobs.gather(1, torch.tensor(token_ids)[:, None]).squeeze(1)


def exact_pass_rate(model, tokenizer, prompt: str, answer: str) -> float:
    """P(first generated character in answer): the probability mass of the tokens that decode to one."""
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        probs = torch.softmax(model(ids).logits[0, -1].double(), -1)
    accepted = [t for t in range(len(probs)) if first_char_in(tokenizer.decode([t], skip_special_tokens=True), answer)]
    return float(probs[accepted].sum())


class Server:
    """`nemo-paced serve-rollouts` as a subprocess; the address file says when and where it listens."""

    def __init__(self, model: Path, problems: Path, state: Path, *extra: str, startup: float = 180) -> None:
        self.address = state.parent / f"{state.name}-address.json"
        self.address.unlink(missing_ok=True)
        command = [sys.executable, "-m", "nemo_paced", "serve-rollouts", "--model", str(model), "--problems",
                   str(problems), "--state-dir", str(state), "--port", "0", "--address-file", str(self.address),
                   "--log-level", "warning", *extra]
        self.log = open(state.parent / f"{state.name}.log", "a")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env={
            **os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])})
        deadline = time.monotonic() + startup
        while not self.address.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                self.log.close()
                raise RuntimeError(f"service did not start; log: {Path(self.log.name).read_text()[-3000:]}")
            time.sleep(0.1)
        self.url = json.loads(self.address.read_text())["url"]

    def client(self, **options) -> RolloutClient:
        return RolloutClient.connect(self.address, **{"retries": 2, "backoff": 0.05, **options})

    def stop(self, sig=signal.SIGTERM) -> int:
        self.process.send_signal(sig)
        code = self.process.wait(60)
        self.log.close()
        return code
