"""Run by tests/test_distributed.py as ``torchrun --nproc_per_node 2 tests/distributed_worker.py OUT_DIR``,
and by tests/test_finetune_fsdp.py as ``torchrun --nproc_per_node 2 tests/distributed_worker.py fsdp2 OUT_DIR``
(:func:`fsdp2_main`: the same steps under DDP and under FSDP2).

Each of the two CPU (gloo) processes trains on its half of a batch; rank 0 saves what the test
compares with one process on the whole batch: batchnorm running statistics, gradients, and the
losses and final weights of a short Trainer run. The model, data and collator live here so that
the single-process reference in the test builds exactly the same ones.
"""

from __future__ import annotations

import json
import os
import sys

import torch

GLOBAL_BATCH = 4
TRAINER_STEPS = 3


def build_model():
    import hfx

    torch.manual_seed(0)
    config = hfx.HfxConfig(
        vocab_size=61,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        norm_type="batchnorm",
        norm_position="pre",
        position_embedding_type="rotary",
    )
    return hfx.HfxForCausalLM(config)


def lm_rows(n: int = GLOBAL_BATCH * TRAINER_STEPS):
    """Sequences of different lengths, so the two processes hold different numbers of real tokens."""
    generator = torch.Generator().manual_seed(1)
    rows = []
    for i in range(n):
        length = 4 + (i * 5) % 7
        ids = torch.randint(1, 61, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": ids})
    return rows


def collate(rows):
    """Right-pad to the longest row: pad id 0, attention 0, label -100."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        ids[i, :n] = torch.tensor(row["input_ids"])
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(row["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def training_arguments(output_dir: str, per_device_batch: int, distributed: bool):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=per_device_batch,
        max_steps=TRAINER_STEPS,
        learning_rate=0.1,
        optim="sgd",  # plain SGD: Adam would magnify float noise in near-zero gradients of the final-weights check
        lr_scheduler_type="constant",
        logging_steps=1,
        train_sampling_strategy="sequential",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        ddp_backend="gloo" if distributed else None,
        disable_tqdm=True,
        seed=0,
    )


def bn_state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def main(out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from transformers import Trainer

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    model = build_model().train()
    ddp = DistributedDataParallel(model)
    batch = collate(lm_rows()[:GLOBAL_BATCH])
    per_rank = GLOBAL_BATCH // world
    shard = {k: v[rank * per_rank : (rank + 1) * per_rank] for k, v in batch.items()}
    num_items = int((batch["labels"][:, 1:] != -100).sum())
    # Each process's share of the global mean loss; DDP averages gradients, hence the * world.
    loss = ddp(**shard, num_items_in_batch=num_items).loss * world
    loss.backward()
    global_loss = loss.detach() / world
    dist.all_reduce(global_loss)
    if rank == 0:
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        torch.save({"bn": bn_state(model), "grads": grads, "loss": global_loss}, os.path.join(out_dir, "ddp.pt"))

    trainer = Trainer(
        model=build_model(),
        args=training_arguments(os.path.join(out_dir, "trainer"), per_rank, distributed=True),
        train_dataset=lm_rows(),
        data_collator=collate,
    )
    trainer.train()
    if rank == 0:
        losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
        with open(os.path.join(out_dir, "trainer.json"), "w") as f:
            json.dump({"losses": losses, "world_size": trainer.args.world_size}, f)
        torch.save(trainer.model.state_dict(), os.path.join(out_dir, "trainer_final.pt"))
    dist.barrier()
    dist.destroy_process_group()


def build_sharding_model(lora: bool):
    """:func:`build_model` with RMSNorm (batch statistics are not what this compares), optionally with LoRA."""
    import hfx

    torch.manual_seed(0)
    config = hfx.HfxConfig(
        vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        norm_type="rmsnorm", norm_position="pre", position_embedding_type="rotary",
    )
    model = hfx.HfxForCausalLM(config)
    if lora:
        from peft import LoraConfig, get_peft_model

        # init_lora_weights=False: B is drawn too, so the first step moves every adapter matrix.
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                                 target_modules=["q_proj", "v_proj", "up_proj"]))
    return model.train()


def fsdp2_main(out_dir: str) -> None:
    """The same SGD steps under DDP and under FSDP2 (``fully_shard`` on each HfxLayer, then the root, as the
    TRANSFORMER_BASED_WRAP policy of examples/accelerate/fsdp2.yaml does), for full and LoRA training.

    Rank 0 writes, per mode, the first step's global loss and whole gradients, the final whole state dict of
    both engines and their save_pretrained folders; FSDP2's come through DTensor.full_tensor() and
    hfx.finetune.train.gathered_state_dict, the gather hfx finetune saves a sharded model with.
    """
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel

    from hfx.finetune.train import gathered_state_dict
    from hfx.modeling_hfx import HfxLayer

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = GLOBAL_BATCH // world
    batches = [collate(lm_rows()[i * GLOBAL_BATCH : (i + 1) * GLOBAL_BATCH]) for i in range(TRAINER_STEPS)]

    def step(module, batch):
        shard = {k: v[rank * per_rank : (rank + 1) * per_rank] for k, v in batch.items()}
        num_items = int((batch["labels"][:, 1:] != -100).sum())
        # each process's share of the global token mean; both engines average gradients, hence * world
        loss = module(**shard, num_items_in_batch=num_items).loss * world
        loss.backward()
        total = loss.detach() / world
        dist.all_reduce(total)
        return total

    for mode in ("full", "lora"):
        ddp_model = build_sharding_model(mode == "lora")
        ddp = DistributedDataParallel(ddp_model)
        fsdp_model = build_sharding_model(mode == "lora")
        for module in fsdp_model.modules():
            if isinstance(module, HfxLayer):
                fully_shard(module)
        fully_shard(fsdp_model)
        record = {}
        for name, module, params in (("ddp", ddp, ddp_model), ("fsdp2", fsdp_model, fsdp_model)):
            optimizer = torch.optim.SGD([p for p in params.parameters() if p.requires_grad], lr=0.1)
            for i, batch in enumerate(batches):
                loss = step(module, batch)
                if i == 0:
                    grads, sharded = {}, 0
                    for key, param in params.named_parameters():
                        if param.grad is None:
                            continue
                        grad = param.grad
                        if isinstance(grad, DTensor):
                            sharded += 1
                            grad = grad.full_tensor()
                        grads[key] = grad.detach().clone().contiguous()
                    record[name] = {"loss": float(loss), "sharded_grads": sharded, "grads": len(grads)}
                    if rank == 0:
                        save_file(grads, os.path.join(out_dir, f"{mode}_{name}_grads.safetensors"))
                optimizer.step()
                optimizer.zero_grad()
            # what hfx finetune saves: the gathered state dict under FSDP2, the model's own otherwise
            gathered = gathered_state_dict(params)
            assert (gathered is None) == (name == "ddp")
            if rank == 0:
                state = params.state_dict() if gathered is None else gathered
                save_file({k: v.detach().clone().contiguous() for k, v in state.items()},
                          os.path.join(out_dir, f"{mode}_{name}_final.safetensors"))
                params.save_pretrained(os.path.join(out_dir, f"{mode}_{name}_saved"), state_dict=gathered)
        if rank == 0:
            with open(os.path.join(out_dir, f"{mode}.json"), "w") as f:
                json.dump(record, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[1] == "fsdp2":
        sys.exit(fsdp2_main(sys.argv[2]))
    main(sys.argv[1])
