"""Two CPU processes (torchrun, gloo) versus one process on the concatenated batch.

The workers get an environment without PYTEST_* variables: with them inherited, the torchrun
children hang in the Trainer part.

``accelerate launch --cpu --num_processes 2`` silently starts ONE process, which would make this
test pass for the wrong reason; torchrun starts two, and the worker asserts the world size.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import distributed_worker as worker

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(ROOT / "tests" / "distributed_worker.py"), str(out),
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        pytest.fail("torchrun did not finish in 180 s:\n" + output[-4000:])
    assert proc.returncode == 0, output[-4000:]
    return out


def single_process_step():
    model = worker.build_model().train()
    batch = worker.collate(worker.lm_rows()[: worker.GLOBAL_BATCH])
    loss = model(**batch).loss
    loss.backward()
    return model, loss.detach()


def test_ddp_batchnorm_statistics_and_gradients_equal_one_process(two_process_run):
    ddp = torch.load(two_process_run / "ddp.pt")
    model, loss = single_process_step()
    torch.testing.assert_close(ddp["loss"], loss, rtol=1e-5, atol=1e-6)
    reference_bn = worker.bn_state(model)
    assert ddp["bn"].keys() == reference_bn.keys() and len(reference_bn) == 3 * 5  # 2 layers x 2 + final, 3 buffers
    for key, value in reference_bn.items():
        torch.testing.assert_close(ddp["bn"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert ddp["grads"].keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(ddp["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # the statistics really are global: one process on rank 0's half alone gives different ones
    half = worker.build_model().train()
    rows = worker.collate(worker.lm_rows()[: worker.GLOBAL_BATCH // 2])
    half(**rows)
    key = next(iter(reference_bn))
    assert not torch.allclose(worker.bn_state(half)[key], reference_bn[key])


def test_trainer_logged_loss_equals_single_process(two_process_run, tmp_path):
    from transformers import Trainer

    logged = json.loads((two_process_run / "trainer.json").read_text())
    assert logged["world_size"] == 2
    trainer = Trainer(
        model=worker.build_model(),
        args=worker.training_arguments(str(tmp_path), worker.GLOBAL_BATCH, distributed=False),
        train_dataset=worker.lm_rows(),
        data_collator=worker.collate,
    )
    trainer.train()
    assert trainer.args.world_size == 1
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == worker.TRAINER_STEPS
    assert losses == pytest.approx(logged["losses"], rel=1e-4), (losses, logged["losses"])
    final = torch.load(two_process_run / "trainer_final.pt")
    for key, value in trainer.model.state_dict().items():
        torch.testing.assert_close(final[key], value, rtol=1e-4, atol=1e-5, msg=key)
