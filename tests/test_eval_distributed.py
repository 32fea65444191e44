"""Data-parallel hfx eval: the deal of requests over ranks, the merge, the shared cache, and two real processes.

The unit tests run the data-parallel logic without processes: ranks are threads whose
``all_gather`` meets at a barrier. The slow tests launch ``hfx eval`` itself under torchrun with
two CPU (gloo) processes and compare with one process: every metric equal, every logged
log-likelihood within 1e-6, and a run whose rank 1 dies partway resumes from the cache with
either world size.

Children get an environment without PYTEST_* variables (inherited, they make torchrun children
hang) and OMP_NUM_THREADS=1. ``accelerate launch --cpu --num_processes 2`` would start ONE
process, so the world size is asserted from the results.
"""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from hfx.evaluation.cache import ResultCache, request_key
from hfx.evaluation.distributed import (
    DataParallelScorer,
    DistributedScoringError,
    DistributedSetupError,
    ProcessGroup,
    context_groups,
    deal,
    process_group,
    shard_generation,
    shard_loglikelihood,
)

ROOT = Path(__file__).resolve().parents[1]


def thread_world(world_size: int) -> list[ProcessGroup]:
    """Groups whose ``all_gather`` meets across threads, one per rank."""
    slots: list = [None] * world_size
    written, read = threading.Barrier(world_size, timeout=60), threading.Barrier(world_size, timeout=60)

    def gather_for(rank):
        def gather(obj):
            slots[rank] = obj
            written.wait()
            out = list(slots)
            read.wait()
            return out
        return gather

    return [ProcessGroup(rank=r, world_size=world_size, local_rank=r, backend="threads", gather=gather_for(r))
            for r in range(world_size)]


def run_ranks(world_size, body):
    """``body(rank, group)`` on one thread per rank; returns each rank's value, re-raises a rank's error."""
    groups, out, errors = thread_world(world_size), [None] * world_size, [None] * world_size

    def target(r):
        try:
            out[r] = body(r, groups[r])
        except BaseException as exc:  # noqa: BLE001
            errors[r] = exc

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out, errors


def mc_requests(rng, docs=30, choices=4, shots="Q: a b c\nA: d\n\n"):
    requests = []
    for d in range(docs):
        context = shots + "Q: " + " ".join(rng.choice("red blue cat dog owl big".split()) for _ in range(rng.randint(2, 30)))
        requests += [(context + "\nA:", f" {rng.choice('ABCD')}{'x' * j}") for j in range(choices)]
    return requests


# -- the deal ------------------------------------------------------------------------------------
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_deal_is_balanced_deterministic_and_complete(world_size):
    rng = random.Random(world_size)
    costs = [rng.randint(1, 200) for _ in range(101)]
    shares = deal(costs, world_size)
    assert sorted(i for s in shares for i in s) == list(range(len(costs)))
    assert all(s == sorted(s) for s in shares)
    loads = [sum(costs[i] for i in s) for s in shares]
    assert max(loads) - min(loads) <= max(costs)  # LPT: within one unit of each other
    assert deal(costs, world_size) == shares
    assert deal([5], 3) == [[0], [], []]


def test_loglikelihood_shards_keep_context_groups_whole_and_balance_tokens():
    rng = random.Random(0)
    requests = mc_requests(rng, docs=40)
    requests.append((requests[0][0] + "  ", "B"))  # trailing spaces move to the continuation: the same row
    shares = shard_loglikelihood(requests, 2)
    assert sorted(i for s in shares for i in s) == list(range(len(requests)))
    owner = {i: r for r, s in enumerate(shares) for i in s}
    for group in context_groups(requests):
        assert len({owner[i] for i in group}) == 1, group
    assert owner[len(requests) - 1] == owner[0]
    sizes = [sum(len(requests[i][1]) for i in s) + sum(len(c) for c in {requests[i][0] for i in s}) for s in shares]
    longest = max(len(requests[g[0]][0]) + sum(len(requests[i][1]) for i in g) for g in context_groups(requests))
    assert abs(sizes[0] - sizes[1]) <= longest


def test_generation_shards_deal_whole_length_sorted_chunks_per_kwargs():
    rng = random.Random(1)
    greedy, other = {"until": ["\n"], "max_gen_toks": 8}, {"until": ["."], "max_gen_toks": 4}
    requests = [("w " * rng.randint(1, 40), greedy if i % 3 else other) for i in range(50)]
    shares = shard_generation(requests, 2, chunk=4)
    assert sorted(i for s in shares for i in s) == list(range(50))
    for share in shares:  # each share is a union of chunks: per kwargs, runs of similar lengths
        assert len({json.dumps(requests[i][1], sort_keys=True) for i in share}) <= 2
    loads = [sum(len(requests[i][0]) + requests[i][1]["max_gen_toks"] for i in s) for s in shares]
    assert abs(loads[0] - loads[1]) <= 4 * (80 + 8)


# -- the wrapper, ranks as threads ----------------------------------------------------------------
class FakeScorer:
    """Deterministic answers per request, a cache counter, warnings and a call log: what the wrapper relies on."""

    def __init__(self, fail_on=None):
        self.seen, self.warnings, self.fail_on = [], [], fail_on
        self.cache = type("Hits", (), {"hits": 0})()
        self.forward_calls, self.batch_size, self.tokenizer, self.progress = 0, None, None, True

    def loglikelihood(self, requests, name=None):
        self.seen.append(list(requests))
        if self.fail_on is not None and any(self.fail_on in c for c, _ in requests):
            raise ValueError(f"cannot score {self.fail_on!r}")
        self.cache.hits += 1
        self.warnings.append(f"warned about {name}")
        return [(-float(len(c) + 3 * len(x)), len(x) % 2 == 0) for c, x in requests]

    def loglikelihood_rolling(self, texts):
        return [-0.5 * len(t) for t in texts]

    def generate_until(self, requests):
        return [c[::-1][:5] + str(k.get("max_gen_toks")) for c, k in requests]


def test_every_rank_returns_every_result_in_request_order():
    rng = random.Random(2)
    requests = mc_requests(rng, docs=25)
    texts = [" ".join("abc" * rng.randint(1, 9)) for _ in range(17)]
    gens = [(f"prompt {i} " * (i % 7 + 1), {"max_gen_toks": 2 + i % 2}) for i in range(23)]
    single = FakeScorer()
    expected = (single.loglikelihood(requests, "t"), single.loglikelihood_rolling(texts), single.generate_until(gens))

    def body(rank, group):
        backend = DataParallelScorer(FakeScorer(), group)
        got = (backend.loglikelihood(requests, "t"), backend.loglikelihood_rolling(texts), backend.generate_until(gens))
        return got, backend

    out, errors = run_ranks(3, body)
    assert errors == [None] * 3
    for got, backend in out:
        assert got == expected
        assert backend.cache.hits == 3  # one hit per rank's call, summed over the world on every rank
        assert backend.warnings == ["warned about t"]  # merged, once
    seen = [b.scorer.seen[0] for _, b in out]
    assert sorted(r for s in seen for r in s) == sorted(requests) and all(seen)
    assert [b.progress for _, b in out] == [True, False, False]


def test_one_ranks_error_is_raised_on_every_rank():
    rng = random.Random(3)
    requests = mc_requests(rng, docs=12)
    poison = requests[-1][0][-12:]

    def body(rank, group):
        return DataParallelScorer(FakeScorer(fail_on=poison), group).loglikelihood(requests)

    _, errors = run_ranks(2, body)
    failing = [e for e in errors if isinstance(e, ValueError) and not isinstance(e, DistributedSetupError)]
    waiting = [e for e in errors if isinstance(e, DistributedScoringError)]
    assert len(failing) == 1 and len(waiting) == 1
    assert "ValueError: cannot score" in str(waiting[0]) and "of 2 failed" in str(waiting[0])


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    from tests.test_eval import _gpt2

    return _gpt2(tmp_path_factory.mktemp("dp-gpt2"))


@pytest.mark.parametrize("batch_size", [None, "auto"], ids=["batches-dealt", "context-groups-dealt"])
def test_real_scorer_sharded_over_two_ranks_equals_one_scorer_and_shares_the_cache(tiny_gpt2, tmp_path, batch_size):
    """The scorer's own batches dealt out whole: bitwise one process's. With a per-rank batch budget ("auto"),
    whole contexts are dealt out instead, and rows meet other rows in a batch: equal to float rounding."""
    from hfx.evaluation.scorer import CausalLMScorer

    model, tok = tiny_gpt2
    rng = random.Random(4)
    requests = mc_requests(rng, docs=16, shots="Question: the cat is big\nAnswer: B\n\n" * 3)
    texts = [" ".join(rng.choice("red blue cat dog owl big".split()) for _ in range(rng.randint(5, 60))) for _ in range(9)]
    gens = [(requests[4 * i][0], {"until": ["\n"], "max_gen_toks": 5, "do_sample": False}) for i in range(7)]
    reference = CausalLMScorer(model, tok, progress=False, max_batch_tokens=512)
    expected = (reference.loglikelihood(requests), reference.loglikelihood_rolling(texts), reference.generate_until(gens))

    def body(rank, group):
        cache = ResultCache(tmp_path, "same-model")
        scorer = CausalLMScorer(copy.deepcopy(model), tok, progress=False, max_batch_tokens=512, cache=cache,
                                batch_size=batch_size)
        backend = DataParallelScorer(scorer, group)
        assert (backend.dealer is not None) == (batch_size is None)
        return backend.loglikelihood(requests), backend.loglikelihood_rolling(texts), backend.generate_until(gens)

    out, errors = run_ranks(2, body)
    assert errors == [None, None]
    for ll, rolling, generated in out:
        assert [g for _, g in ll] == [g for _, g in expected[0]]
        if batch_size is None:
            assert ll == expected[0] and rolling == expected[1]  # bitwise
        else:  # float rounding: a few fp32 ulps of each value (one ulp is 3.8e-6 near -40, 3.1e-5 near -331)
            ulps = 4 * torch.finfo(torch.float32).eps
            assert [x for x, _ in ll] == pytest.approx([x for x, _ in expected[0]], abs=1e-5, rel=ulps)
            assert rolling == pytest.approx(expected[1], abs=1e-5, rel=ulps)
        assert generated == expected[2]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["same-model.rank0.jsonl", "same-model.rank1.jsonl"]
    resumed = ResultCache(tmp_path, "same-model")  # one process reads what both ranks wrote
    scorer = CausalLMScorer(model, tok, progress=False, cache=resumed)
    assert scorer.loglikelihood(requests) == out[0][0] and resumed.hits == len(requests)


def test_ranks_that_form_other_batches_fall_back_and_one_that_fails_stops_every_rank(tiny_gpt2):
    from hfx.evaluation.scorer import CausalLMScorer

    model, tok = tiny_gpt2
    requests = mc_requests(random.Random(5), docs=8)

    expected = CausalLMScorer(model, tok, progress=False, max_batch_tokens=128).loglikelihood(requests)

    def differing(rank, group):  # other batches per rank: noticed, and the call dealt out by contexts instead
        scorer = CausalLMScorer(copy.deepcopy(model), tok, progress=False, max_batch_tokens=128 * (rank + 1))
        return DataParallelScorer(scorer, group).loglikelihood(requests)

    out, errors = run_ranks(2, differing)
    assert errors == [None, None]
    for got in out:
        assert [g for _, g in got] == [g for _, g in expected]
        assert [x for x, _ in got] == pytest.approx([x for x, _ in expected], abs=1e-5, rel=0)

    def failing(rank, group):
        scorer = CausalLMScorer(copy.deepcopy(model), tok, progress=False, max_batch_tokens=128)
        if rank == 1:
            def broken(*args, **kwargs):
                raise RuntimeError("out of memory on this rank")
            scorer._forward = broken
        return DataParallelScorer(scorer, group).loglikelihood(requests)

    _, errors = run_ranks(2, failing)
    assert isinstance(errors[1], RuntimeError) and not isinstance(errors[1], DistributedScoringError)
    assert isinstance(errors[0], DistributedScoringError)
    assert "rank 1 of 2 failed while scoring: RuntimeError: out of memory on this rank" in str(errors[0])


def test_differing_plans_fall_back_before_any_batch_runs_and_ranks_agree_on_the_memory_bound(tiny_gpt2):
    """The plans' fingerprints meet in a gather inside select, before any forward: ranks whose batches
    differ run none of them, and deal out contexts at once. The shared-prefix memory bound is the
    smallest rank's on every rank, so it cannot make their plans differ."""
    from hfx.evaluation.scorer import CausalLMScorer

    model, tok = tiny_gpt2
    requests = mc_requests(random.Random(6), docs=6, shots="Question: the cat is big\nAnswer: B\n\n" * 3)
    expected = CausalLMScorer(model, tok, progress=False, max_batch_tokens=128).loglikelihood(requests)

    def body(rank, group):
        scorer = CausalLMScorer(copy.deepcopy(model), tok, progress=False, max_batch_tokens=128 * (rank + 1))
        scorer._kv_key_memory = 5000 + 1000 * rank  # as measured on this rank
        scorer._shares_prefixes = True  # the probe's forwards are not the call's work
        forwards, inner = [], scorer._forward
        def counted(rows, prefix=(), past=None):
            forwards.append(scorer.data_parallel is not None)  # True: a forward of the dealt-batches attempt
            return inner(rows, prefix, past)
        scorer._forward = counted
        backend = DataParallelScorer(scorer, group)
        return backend.loglikelihood(requests), forwards, scorer.kv_key_memory(), scorer.batch_info

    out, errors = run_ranks(2, body)
    assert errors == [None, None]
    for got, forwards, bound, info in out:
        assert [g for _, g in got] == [g for _, g in expected]
        assert [x for x, _ in got] == pytest.approx([x for x, _ in expected], abs=1e-5, rel=0)
        assert forwards and not any(forwards)  # every forward ran after the fallback
        assert bound == 5000 and info["prefix_kv_keys_in_memory"] == 5000


# -- the cache with several writers ---------------------------------------------------------------
def test_cache_reads_the_single_process_file_and_every_rank_file(tmp_path):
    (tmp_path / "ident.jsonl").write_text('{"k": "old", "v": [-1.5, true]}\n')  # a cache from before ranks
    (tmp_path / "other.rank0.jsonl").write_text('{"k": "foreign", "v": 1}\n')
    (tmp_path / "ident.rankx.jsonl").write_text('{"k": "not-a-rank", "v": 1}\n')
    for rank in (0, 1):
        writer = ResultCache(tmp_path, "ident", rank=rank)
        writer.put_many({f"from-{rank}": [float(-rank), False]})
        assert writer.path.name == f"ident.rank{rank}.jsonl"
    reader = ResultCache(tmp_path, "ident")
    assert reader.values == {"old": [-1.5, True], "from-0": [0.0, False], "from-1": [-1.0, False]}
    assert [p.name for p in reader.files()] == ["ident.jsonl", "ident.rank0.jsonl", "ident.rank1.jsonl"]
    assert reader.path.name == "ident.jsonl"
    with pytest.raises(ValueError, match="rank must be an integer >= 0"):
        reader.use_rank(-1)


def test_a_line_cut_short_by_a_kill_does_not_swallow_the_next_record(tmp_path):
    key = request_key("ll", [1, 2], [3])
    (tmp_path / "ident.rank1.jsonl").write_text('{"k": "a", "v": 1}\n{"k": "cut sh')
    cache = ResultCache(tmp_path, "ident", rank=1)
    assert cache.values == {"a": 1}
    cache.put_many({key: [-2.0, True]})
    again = ResultCache(tmp_path, "ident")
    assert again.values == {"a": 1, key: [-2.0, True]}
    assert again.get(key) == [-2.0, True] and again.hits == 1


def test_concurrent_writers_to_one_file_never_interleave_lines(tmp_path):
    """Independent single-process runs share ``{identity}.jsonl``: each batch is one O_APPEND write."""
    script = (  # cache.py alone (standard library only): no torch import in the writers
        "import sys, importlib.util as u\n"
        f"spec = u.spec_from_file_location('cache', {str(ROOT / 'hfx' / 'evaluation' / 'cache.py')!r})\n"
        "m = u.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "c = m.ResultCache(sys.argv[1], 'ident')\n"
        "for b in range(40):\n"
        "    c.put_many({f'{sys.argv[2]}-{b}-{i}': 'x' * 300 for i in range(30)})\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), name]) for name in "ab"]
    assert [p.wait(60) for p in procs] == [0, 0]
    lines = (tmp_path / "ident.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 40 * 30 and all(json.loads(line)["v"] == "x" * 300 for line in lines)


# -- the process group --------------------------------------------------------------------------
def _launched(monkeypatch, world=2, rank=1):
    for name, value in (("WORLD_SIZE", world), ("RANK", rank), ("LOCAL_RANK", rank),
                        ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29999")):
        monkeypatch.setenv(name, str(value))


def test_not_launched_is_a_world_of_one(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    group = process_group("cpu")
    assert (group.rank, group.world_size, group.is_main, group.backend) == (0, 1, True, None)
    assert group.all_gather({"x": 1}) == [{"x": 1}]
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun --nproc_per_node 1
    assert process_group("cpu", device_map="auto").world_size == 1
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("device, device_map, message", [
    ("cpu", "auto", r"device_map='auto'.*needs a whole model on each rank"),
    ("mps", None, r"--device mps cannot run in a world of 2 processes.*cpu \(gloo\) or cuda \(nccl\)"),
    ("cuda", None, r"--device cuda: CUDA is not available"),
])
def test_launched_world_refuses_what_data_parallel_cannot_run(monkeypatch, device, device_map, message):
    _launched(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the refusal is for a machine without CUDA
    with pytest.raises(DistributedSetupError, match=message):
        process_group(device, device_map=device_map)
    assert not torch.distributed.is_initialized()


def test_launched_world_needs_the_launcher_variables(monkeypatch):
    _launched(monkeypatch)
    monkeypatch.delenv("MASTER_PORT")
    with pytest.raises(DistributedSetupError, match="MASTER_PORT is not set; launch with torchrun"):
        process_group("cpu")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(DistributedSetupError, match="RANK=2 is outside the world of WORLD_SIZE=2"):
        process_group("cpu")


# -- two real processes: torchrun, gloo, the hfx eval CLI -------------------------------------------
MMLU = """task: tiny_mmlu
dataset_path: json
dataset_kwargs:
  data_files:
    train: {root}/train.jsonl
    test: {root}/test.jsonl
output_type: multiple_choice
training_split: train
test_split: test
description: "The following are questions about colours and animals.\\n\\n"
doc_to_text: "{{{{question}}}}\\nA. {{{{choices[0]}}}}\\nB. {{{{choices[1]}}}}\\nC. {{{{choices[2]}}}}\\nD. {{{{choices[3]}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: ["A", "B", "C", "D"]
num_fewshot: 3
fewshot_config:
  sampler: first_n
metric_list:
  - metric: acc
  - metric: acc_norm
"""
# multi-word choices after a first_n prefix, one-letter choices after a longer one, rolling (no shared prefix),
# generation: every request type and both batch kinds (random-shot multiple choice, the same no-prefix
# batches as rolling, is left to the in-process tests above: one task fewer in each of the three runs)
E2E_TASKS = ["tiny_mc_first", "tiny_mmlu", "tiny_ppl", "tiny_gen"]


def _child_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return env


def _torchrun(args, env=None, log_dir=None, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    if log_dir is not None:  # each rank's stdout and stderr in its own file
        cmd += ["--log-dir", str(log_dir), "--redirects", "3"]
    proc = subprocess.run(cmd + args, cwd=ROOT, env={**_child_env(), **(env or {})}, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
    return proc.returncode, proc.stdout


@pytest.fixture(scope="module")
def dp_world(tmp_path_factory):
    from hfx.evaluation import evaluate
    from tests.test_eval import _gpt2, _write_tasks

    root = tmp_path_factory.mktemp("dp-eval")
    tasks = _write_tasks(root)
    (tasks / "mmlu.yaml").write_text(MMLU.format(root=root))
    _gpt2(root)
    model = root / "gpt2"
    common = ["eval", "--model", str(model), "--tasks", ",".join(E2E_TASKS), "--include-path", str(tasks),
              "--max-batch-tokens", "512", "--device", "cpu"]
    reference = evaluate(model, E2E_TASKS, include_path=tasks, max_batch_tokens=512, cache_dir=False, progress=False,
                         return_records=True, device="cpu")
    # 1. rank 1 dies in the second call: a killed run, the cache holding what each rank had written
    crashed = root / "cache"
    code, crash_output = _torchrun([str(ROOT / "tests" / "eval_distributed_worker.py"), *common, "--cache-dir",
                                    str(crashed)], env={"HFX_TEST_EXIT_RANK": "1"})
    written = {p.name: [json.loads(line)["k"] for line in p.read_text().splitlines()] for p in crashed.glob("*.jsonl")}
    single_resume = root / "cache-copy"
    single_resume.mkdir()
    for p in crashed.glob("*.jsonl"):
        (single_resume / p.name).write_bytes(p.read_bytes())
    # 2. the same command, two processes again, through `python -m hfx eval`: resumes from both ranks' files
    out, logs = root / "out", root / "logs"
    code2, output2 = _torchrun(["-m", "hfx", *common, "--cache-dir", str(crashed), "--output",
                                str(out / "results.json"), "--log-samples"], log_dir=logs)
    assert code2 == 0, output2[-4000:] + "".join(p.read_text()[-3000:] for p in logs.rglob("std*.log"))
    return {"root": root, "tasks": tasks, "model": model, "reference": reference, "crash": (code, crash_output),
            "written": written, "single_resume": single_resume, "out": out, "logs": logs}


def _samples(out: Path) -> dict[str, list[dict]]:
    found = {}
    for task in E2E_TASKS:
        (path,) = [p for p in out.iterdir() if task in p.name and p.name != "results.json"
                   and p.name.split(task)[1][:1] in (".", "_", "")]
        found[task] = [json.loads(line) for line in path.read_text().splitlines()]
    return found


def _assert_same_as_one_process(results, records, reference):
    ref_results, ref_records = reference
    assert results["results"].keys() == ref_results["results"].keys()
    for task, metrics in ref_results["results"].items():
        assert results["results"][task] == metrics, task  # every metric (and stderr) equal
    for task, recs in ref_records.items():
        assert len(records[task]) == len(recs)
        for got, want in zip(records[task], recs):
            assert got["doc_id"] == want["doc_id"] and got["arguments"] == want["arguments"]
            if task == "tiny_gen":
                assert got["resps"] == want["resps"]
            elif task == "tiny_ppl":
                assert got["resps"] == pytest.approx(want["resps"], abs=1e-6, rel=0)
            else:
                assert [r[0] for r in got["resps"]] == pytest.approx([r[0] for r in want["resps"]], abs=1e-6, rel=0)
                assert [bool(r[1]) for r in got["resps"]] == [bool(r[1]) for r in want["resps"]]


@pytest.mark.slow
def test_a_killed_two_process_run_left_both_ranks_batches_in_the_cache(dp_world):
    code, output = dp_world["crash"]
    assert code != 0, output[-3000:]
    written = dp_world["written"]
    assert set(written) == {f"{n.split('.')[0]}.rank0.jsonl" for n in written} | {
        f"{n.split('.')[0]}.rank1.jsonl" for n in written}, written
    by_rank = {name.rsplit(".", 2)[1]: keys for name, keys in written.items()}
    # both shares of the first call (it ended in a collective), then rank 1's first batch of the second
    assert by_rank["rank0"] and by_rank["rank1"], {k: len(v) for k, v in by_rank.items()}


@pytest.mark.slow
def test_two_processes_resume_and_equal_one_process(dp_world):
    out = dp_world["out"]
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["world_size"] == 2
    assert 0 < results["config"]["cache_hits"] < sum(len(r["arguments"]) for recs in dp_world["reference"][1].values()
                                                     for r in recs)
    assert results["config"]["cache_hits"] >= len({k for keys in dp_world["written"].values() for k in keys})
    _assert_same_as_one_process(results, _samples(out), dp_world["reference"])
    stdout = {p.parent.name: p.read_text() for p in dp_world["logs"].rglob("stdout.log")}
    assert set(stdout) == {"0", "1"}
    assert "results: " in stdout["0"] and "| tiny_mmlu |" in stdout["0"]
    assert stdout["1"].strip() == ""  # only rank 0 prints and writes


@pytest.mark.slow
def test_one_process_resumes_what_two_killed_processes_wrote(dp_world):
    from hfx.evaluation import evaluate

    results, records = evaluate(dp_world["model"], E2E_TASKS, include_path=dp_world["tasks"], max_batch_tokens=512,
                                cache_dir=dp_world["single_resume"], progress=False, return_records=True,
                                device="cpu")
    assert results["config"]["world_size"] == 1
    assert results["config"]["cache_hits"] >= len({k for keys in dp_world["written"].values() for k in keys}) > 0
    _assert_same_as_one_process(results, records, dp_world["reference"])


def test_a_model_spread_over_devices_is_refused_by_the_wrapper():
    scorer = FakeScorer()
    scorer.model = type("Spread", (), {"hf_device_map": {"layer.0": 0, "layer.1": 1}})()
    group = ProcessGroup(rank=0, world_size=2, gather=lambda obj: [obj, obj])  # a rank 1 that always agrees
    with pytest.raises(DistributedSetupError, match=r"spread over \['0', '1'\].*whole model on each rank"):
        DataParallelScorer(scorer, group)
    scorer.model.hf_device_map = {"": 0}  # one device: a whole model
    assert DataParallelScorer(scorer, group).model is scorer.model
