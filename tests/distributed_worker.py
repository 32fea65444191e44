"""Run by tests/test_distributed.py as ``torchrun --nproc_per_node 2 tests/distributed_worker.py OUT_DIR``.

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


if __name__ == "__main__":
    main(sys.argv[1])
