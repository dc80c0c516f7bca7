"""GPU smoke check: the Paced distillation step on one GPU with NCCL, against ModelOpt's own KD step.

Both run side by side in this process on the same models and data: (a) ModelOpt's default
`LogitsKLLoss` criterion with a plain token-mean loss (Bridge's stock KD step, the baseline) and
(b) the Paced KL criterion with `PacedForwardStep` (weights, global normalisation, report).
Prints the step time and peak memory of each and their ratios. Launch with
`torchrun --nproc-per-node 1 bench/gpu_smoke.py` (bench/gpu_smoke.sh does). Without CUDA it runs on
CPU through the test shims, which checks the script only: its numbers mean nothing there.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024, help="student hidden size (teacher: twice)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--micro-batches", type=int, default=4, help="micro-batches per step")
    parser.add_argument("--steps", type=int, default=6, help="timed steps of each, interleaved, after one warm-up")
    return parser.parse_args()


def gpt(hidden: int, args, device_init: bool):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(num_layers=args.layers, hidden_size=hidden, num_attention_heads=hidden // 64,
                               use_cpu_initialization=not device_init, hidden_dropout=0.0, attention_dropout=0.0,
                               bf16=device_init, params_dtype=torch.bfloat16 if device_init else torch.float32,
                               pipeline_dtype=torch.bfloat16 if device_init else torch.float32,
                               gradient_accumulation_fusion=False, bias_dropout_fusion=False,
                               masked_softmax_fusion=False, persist_layer_norm=False, apply_rope_fusion=False,
                               calculate_per_token_loss=True)
    return GPTModel(config, get_gpt_layer_local_spec(), vocab_size=args.vocab, max_sequence_length=args.seq)


def batches(args, device, n):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, args.vocab, (args.micro_batch, args.seq), generator=g)
        loss_mask = torch.ones(args.micro_batch, args.seq)
        loss_mask[:, : args.seq // 4] = 0  # prompt
        out.append({k: v.to(device) for k, v in dict(
            tokens=tokens, labels=torch.roll(tokens, -1, 1), loss_mask=loss_mask,
            position_ids=torch.arange(args.seq).expand(args.micro_batch, args.seq).contiguous(),
            sample_weight=torch.rand(args.micro_batch, generator=g) * 0.25).items()})
    return out


def modelopt_step(data_iterator, model):
    """Bridge's stock KD step, reduced to its essentials: token-mean of ModelOpt's partial KL."""
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    mask = batch["loss_mask"]

    def loss(output_tensor):
        kd = model.module.compute_kd_loss(loss_reduction_fn=lambda x: (x[0].float() * mask).sum(),
                                          skip_balancer=True)
        value = next(iter(kd.values()))
        return value, mask.sum().to(torch.int), {"kl": torch.stack([value.detach(), mask.sum()])}

    return output, loss


def main() -> None:
    args = parse()
    cuda = torch.cuda.is_available()
    if not cuda:  # check the script on a CPU machine: megatron-core needs the test-only shims there
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        import megatron_shims

        megatron_shims.apply()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    import modelopt.torch.distill as mtd
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from modelopt.torch.distill.plugins import megatron as mtd_mcore

    from nemo_paced.megatron.step import PacedForwardStep
    from nemo_paced.megatron.teacher import distillation_model

    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(0)

    def build(paced: bool):
        student, teacher = gpt(args.hidden, args, cuda), gpt(2 * args.hidden, args, cuda)
        if paced:
            kd = distillation_model(student, teacher, "fkl")
        else:
            config = mtd_mcore.setup_distillation_config(None, student.config, teacher.config)
            kd = mtd.convert(student, mode=[("kd_loss", {"teacher_model": teacher.eval().requires_grad_(False),
                                                         "criterion": config.criterion,
                                                         "loss_balancer": config.loss_balancer})])
            mtd_mcore.adjust_distillation_model_for_mcore(kd, config)
        kd.to(device)
        kd.config.finalize_model_grads_func = finalize_model_grads
        return DistributedDataParallel(kd.config, DistributedDataParallelConfig(), kd)

    data = batches(args, device, args.micro_batches)
    configs = {"modelopt": (build(False), modelopt_step),
               "paced": (build(True), PacedForwardStep(num_microbatches=args.micro_batches))}

    def run_step(name: str) -> tuple[float, list[dict]]:
        model, step = configs[name]
        model.zero_grad_buffer()
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        reports = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter(data), model=[model], num_microbatches=len(data),
            seq_length=args.seq, micro_batch_size=args.micro_batch, decoder_seq_length=args.seq, forward_only=False)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, reports

    peak, kl, times = {}, {}, {name: [] for name in configs}
    for name in configs:  # warm-up, and the peak memory of one step of each alone
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        _, reports = run_step(name)
        peak[name] = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        total = sum(r["paced kl" if name == "paced" else "kl"] for r in reports)
        kl[name] = (total[0] / total[1]).item()
    for _ in range(args.steps):  # interleaved, so drifting clocks or load hit both alike
        for name in configs:
            times[name].append(run_step(name)[0])
    results = {name: (sorted(times[name])[len(times[name]) // 2], peak[name], kl[name]) for name in configs}

    tokens = args.micro_batch * args.micro_batches * args.seq
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu (script check only)'}; "
          f"student hidden {args.hidden}, teacher {2 * args.hidden}, {args.layers} layers, vocab {args.vocab}, "
          f"{tokens} tokens per step")
    print(f"{'':10}{'median step s':>14}{'peak GiB':>10}{'KL':>10}")
    for name, (seconds, gib, value) in results.items():
        print(f"{name:10}{seconds:14.4f}{gib:10.2f}{value:10.4f}")
    (t0, m0, _), (t1, m1, _) = results["modelopt"], results["paced"]
    print(f"paced / modelopt: step time x{t1 / t0:.3f}, peak memory x{m1 / m0:.3f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
