"""Training scenarios run by tests/test_distributed.py, both on 2 processes (gloo) and on 1 process on the full batch.

    python tests/distributed_worker.py --mode single --out DIR
    torchrun --nproc-per-node 2 tests/distributed_worker.py --mode ddp|fsdp2 --out DIR   (or spawned by the test)

Every scenario builds the same tiny model from a seed, patches it with fastprompt, takes a few AdamW steps on a
fixed batch of 4 rows (each of 2 ranks takes 2 of them), and writes the trained prompt parameters to
DIR/<scenario>-<mode>.pt. Rows have equal lengths and no padding, so the mean loss over a rank's rows averaged over
ranks is the mean over the full batch: DDP and FSDP2 must give the single-process parameters.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

STEPS = 3
BATCH, SEQ, VOCAB = 4, 6, 61
SCENARIOS = ("peft_prefix_tuning", "prompt_pool")


def _llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()  # eval: no dropout anywhere, the runs are deterministic


def build(scenario: str):
    import fastprompt as fp

    model = _llama(seed=0)
    if scenario == "peft_prefix_tuning":
        import peft

        model = peft.get_peft_model(model, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                                    prefix_projection=True, encoder_hidden_size=16))
        torch.manual_seed(1)
        for p in model.parameters():
            if p.requires_grad:
                p.data.normal_(0, 0.5)
        fp.patch_model(model)
    elif scenario == "prompt_pool":
        torch.manual_seed(1)
        prompt = fp.PromptPool(model.config, pool_size=5, length=2, top_k=2, placement="prefix", layers=[0, 1])
        fp.patch_model(model, prompt)
    else:
        raise ValueError(scenario)
    return model


def batch():
    g = torch.Generator().manual_seed(123)
    ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=g)
    return ids, torch.ones_like(ids)


def trained_prompt_parameters(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def train(model, rows: slice, wrapped=None):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.05)
    ids, mask = batch()
    ids, mask = ids[rows], mask[rows]
    runner = wrapped if wrapped is not None else model
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = runner(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        optimizer.step()
    return model


def run_single(out: str) -> None:
    for scenario in SCENARIOS:
        model = build(scenario)
        torch.save(trained_prompt_parameters(model), os.path.join(out, f"{scenario}-initial.pt"))
        train(model, slice(0, BATCH))
        torch.save(trained_prompt_parameters(model), os.path.join(out, f"{scenario}-single.pt"))


def run_rank(rank: int, world: int, mode: str, out: str, init: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        per_rank = BATCH // world
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        for scenario in SCENARIOS:
            model = build(scenario)
            if mode == "ddp":
                from torch.nn.parallel import DistributedDataParallel

                wrapped = DistributedDataParallel(model)
                train(model, rows, wrapped)
                params = trained_prompt_parameters(model)
            elif mode == "fsdp2":
                from torch.distributed.fsdp import fully_shard

                fully_shard(model)  # parameters become DTensors sharded over the 2 ranks
                train(model, rows)
                params = {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                          for name, p in model.named_parameters() if p.requires_grad}
            else:
                raise ValueError(mode)
            if rank == 0:
                torch.save(params, os.path.join(out, f"{scenario}-{mode}.pt"))
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawned(rank, world, mode, out, init):
    run_rank(rank, world, mode, out, init)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("single", "ddp", "fsdp2"), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--world", type=int, default=2)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(1)
    if args.mode == "single":
        run_single(args.out)
    elif "RANK" in os.environ:  # under torchrun
        run_rank(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args.mode, args.out, "env://")
    else:
        import torch.multiprocessing as mp

        init = "file://" + os.path.join(os.path.abspath(args.out), f"rendezvous-{args.mode}")
        if os.path.exists(init[len("file://"):]):
            os.remove(init[len("file://"):])
        mp.spawn(_spawned, args=(args.world, args.mode, args.out, init), nprocs=args.world, join=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout's fastprompt
    sys.exit(main())
