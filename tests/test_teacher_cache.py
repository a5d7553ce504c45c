"""The exact teacher cache bounded by disk, not by RAM (issue 26), and its failure cases
(issue 25: a full disk, a killed build, two builds of one cache at once).

The file is a standard safetensors file written while the teacher pass goes; training reads
the batch's rows only. Measured in fresh subprocesses (`perf.bench.cache_child`): a cache
larger than the address-space limit the test sets is built and trained from, and training
from a cache 4x larger leaves peak RSS where it was. The chunked teacher side gives the
values and gradients of the full logits; training from the file is bit-identical to
training from the same cache in memory."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from dpkd_lib import losses
from dpkd_lib import objectives as obj_lib
from dpkd_lib import teacher_cache as tc
from dpkd_lib.config import TrainConfig
from dpkd_lib.data import collate_sft
from dpkd_lib.errors import OutOfResources, human_bytes
from dpkd_lib.perf import bench

ROOT = Path(__file__).resolve().parent.parent
V, H = 96, 40


def _examples(n_rows=600, vocab=V, seed=0):
    return bench.wide_examples(n_rows, vocab=vocab, prompt=5, response=20, seed=seed)


# --------------------------------------------------------------------------- the file

def test_signal_file_is_safetensors_read_by_rows(tmp_path):
    from safetensors.torch import load_file
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 7, generator=g), torch.randn(11, 3, generator=g).to(torch.bfloat16)
    ids = torch.randint(0, 9, (50, 4), generator=g, dtype=torch.int32)
    path = tmp_path / "s.safetensors"
    w = tc.SignalWriter(path, {"a": (a.dtype, a.shape), "ids": (ids.dtype, ids.shape), "b": (b.dtype, b.shape)})
    for lo in range(0, 50, 16):  # rows as they come, one block at a time
        w.append("a", a[lo:lo + 16])
        w.append("ids", ids[lo:lo + 16])
    w.append("b", b)
    w.close()
    whole = load_file(str(path))  # the field's own reader agrees
    assert torch.equal(whole["a"], a) and torch.equal(whole["ids"], ids) and torch.equal(whole["b"], b)
    f = tc.SignalFile(path)
    assert torch.equal(f.rows("a", [(40, 45), (3, 5), (7, 7)]), torch.cat([a[40:45], a[3:5]]))
    assert torch.equal(f.read("b"), b) and torch.equal(f.rows("ids", [(0, 50)]), ids)
    with pytest.raises(IndexError, match="rows 48:51"):
        f.rows("a", [(48, 51)])
    f.close()
    with pytest.raises(ValueError, match="more rows"):  # the header bounds every tensor
        w = tc.SignalWriter(tmp_path / "t.safetensors", {"a": (a.dtype, (2, 7))})
        w.append("a", a[:3])
    path.write_bytes(path.read_bytes()[:-10])  # truncated: refused on open, not mid-run
    with pytest.raises(ValueError, match="truncated"):
        tc.SignalFile(path)


def test_incomplete_writer_is_refused_and_size_reserved_up_front(tmp_path):
    path = tmp_path / "s.safetensors"
    w = tc.SignalWriter(path, {"a": (torch.float32, (1000, 100))})
    assert path.stat().st_size >= 400_000  # posix_fallocate reserved the whole file
    w.append("a", torch.zeros(10, 100))
    with pytest.raises(ValueError, match="has 4000 of 400000 bytes"):
        w.close()


# --------------------------------------------------------------------------- same values

def _hidden_signal(n=37, vocab=V, hidden=H, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2, n, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) / hidden ** 0.5
    b = torch.randn(vocab, generator=g) if bias else None
    return losses.TeacherHidden(h, w, b)


@pytest.mark.parametrize("name", ["dpkd", "kd", "rkl", "jsd", "skl", "srkl", "soft_ce"])
def test_chunked_teacher_side_gives_the_full_logits_values_and_gradients(name):
    """The lean losses compute the cached teacher's logits chunk by chunk from its hidden
    states: the same loss and student gradient as from the whole [N, V] logits."""
    sig = _hidden_signal()
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, V, (2, 37), generator=g)
    labels[:, :9] = -100
    labels[1, 30:] = -100
    fns = {"dpkd": lambda s, t, c: losses.dpkd_token_loss(s, t, labels, beta=0.5, chunk_size=c),
           "kd": lambda s, t, c: losses.forward_kl(s, t, labels, chunk_size=c),
           "rkl": lambda s, t, c: losses.reverse_kl(s, t, labels, temperature=2.0, chunk_size=c),
           "jsd": lambda s, t, c: losses.js_divergence(s, t, labels, beta=0.3, chunk_size=c),
           "skl": lambda s, t, c: losses.skew_forward_kl(s, t, labels, chunk_size=c),
           "srkl": lambda s, t, c: losses.skew_reverse_kl(s, t, labels, chunk_size=c),
           "soft_ce": lambda s, t, c: losses.soft_cross_entropy(s, t, labels, chunk_size=c)}
    fn = fns[name]
    full = sig.logits()
    assert full.shape == sig.shape == (2, 37, V)
    base = torch.randn(2, 37, V, generator=g)
    results = []
    for teacher, chunk in ((full, None), (full, 5), (sig, None), (sig, 5), (sig, 1000)):
        s = base.clone().requires_grad_(True)
        loss = fn(s, teacher, chunk)
        loss.backward()
        results.append((loss.detach(), s.grad))
    ref_loss, ref_grad = results[0]
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-8)
    # from the same logits the chunked cache path is exact, not only close
    assert torch.equal(results[2][0], ref_loss)


def test_teacher_hidden_matches_the_online_head_bit_for_bit():
    """Online: head(hidden.to(head dtype)).float(); cached: the same call on stored rows."""
    head = torch.nn.Linear(H, V, bias=True).to(torch.bfloat16)
    hidden = torch.randn(1, 12, H).to(torch.bfloat16)
    sig = losses.TeacherHidden(hidden, head.weight.detach(), head.bias.detach())
    assert torch.equal(sig.logits(), head(hidden).float())


# --------------------------------------------------------------------------- training from it

def _train(cache, steps=4, objective="dpkd_token", chunk=7, seed=0):
    student = bench._tiny_student(V, seed=seed)
    t = TrainConfig(objective=objective, teacher_mode="cache", loss_chunk_size=chunk)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    teacher = obj_lib.CachedTeacher(cache)
    ex = _examples()
    losses_seen = []
    for step in range(steps):
        batch = collate_sft([ex[(step * 5 + j) % len(ex)] for j in range(4)], 0)
        out = obj_lib.step_loss(t, student, teacher, batch)
        out.total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses_seen.append(out.total.item())
    return losses_seen, {k: v.detach().clone() for k, v in student.state_dict().items()}


@pytest.mark.parametrize("objective,chunk", [("dpkd_token", 7), ("dpkd_token", 0), ("kd", 7)])
def test_training_from_the_file_is_bit_identical_to_the_cache_in_memory(tmp_path, objective, chunk):
    teacher = bench.WideTeacher(V, H)
    ex = _examples()
    memory = tc.compute_signals(teacher, ex, 0, fmt="hidden", batch_size=8, progress=False)
    disk = tc.build(tmp_path / "c", teacher, ex, 0, 0, meta={}, fmt="hidden", batch_size=8, progress=False)
    assert isinstance(disk.store, tc.SignalFile) and isinstance(memory.store, dict)
    assert disk.index == memory.index
    la, wa = _train(memory, objective=objective, chunk=chunk)
    lb, wb = _train(disk, objective=objective, chunk=chunk)
    assert la == lb
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # and the rows are the online teacher's hidden states, in batch order
    batch = collate_sft(ex[3:6], 0)
    online, _ = obj_lib.response_hidden(teacher, batch)
    counts = obj_lib.response_counts(batch)
    assert torch.equal(disk.teacher_hidden(batch["ids"], counts).hidden[0], online)


def test_topk_cache_streams_too(tmp_path):
    teacher = bench.WideTeacher(V, H)
    ex = _examples(200)
    memory = tc.compute_signals(teacher, ex, 0, 8, fmt="topk", batch_size=8, progress=False)
    disk = tc.build(tmp_path / "c", teacher, ex, 0, 8, meta={}, fmt="topk", batch_size=8, progress=False)
    ids = [e["id"] for e in ex[2:5]]
    for a, b in zip(memory.gather(ids), disk.gather(ids)):
        assert torch.equal(a, b)
    assert disk.k == 8


# --------------------------------------------------------------------------- memory, measured

@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    """A 4x cache (~0.9 GB) built and trained from under RLIMIT_AS = the child's size after
    its imports + 128 MiB, which is smaller than the cache; a 1x cache built beside it."""
    tmp = tmp_path_factory.mktemp("cache-mem")
    base = {"vocab": 1024, "hidden": 2560, "steps": 6, "batch": 8}
    big = bench.run_cache_child(dict(base, form="disk", rows=90_000, folder=str(tmp / "c4"),
                                     actions=["build", "train"], headroom=128 * 2 ** 20))
    small = bench.run_cache_child(dict(base, form="disk", rows=22_500, folder=str(tmp / "c1"),
                                       actions=["build"], steps=0))
    yield {"tmp": tmp, "base": base, "big": big, "small": small}
    for name in ("c4", "c1"):  # ~1.1 GB: do not leave it to pytest's temp retention
        import shutil
        shutil.rmtree(tmp / name, ignore_errors=True)


def test_a_cache_larger_than_the_memory_limit_is_built_and_trained_from(limited):
    big = limited["big"]
    assert "error" not in big, big["error"]   # the exception the limited child met (a full disk?)
    assert big["cache_bytes"] > big["limit"], "the cache must be larger than the limit"
    assert big["steps"] == 6 and big["loss"] == big["loss"]
    # the old form (the whole cache in memory) cannot run under the same limit
    old = bench.run_cache_child(dict(limited["base"], form="memory", rows=90_000,
                                     folder=str(limited["tmp"] / "c4"), actions=["train"],
                                     headroom=128 * 2 ** 20))
    assert "error" in old and "steps" not in old, old


def test_peak_rss_of_training_does_not_grow_with_the_cache(limited):
    tmp, base = limited["tmp"], limited["base"]
    rss = {}
    for name, rows in (("c1", 22_500), ("c4", 90_000)):
        res = bench.run_cache_child(dict(base, form="disk", rows=rows, folder=str(tmp / name), actions=["train"]))
        assert res.get("steps") == 6, res.get("error", res)
        rss[name] = res["peak_rss"]
    grown = limited["big"]["cache_bytes"] - limited["small"]["cache_bytes"]  # ~690 MB
    assert abs(rss["c4"] - rss["c1"]) < 0.05 * grown, (rss, grown)


# --------------------------------------------------------------------------- failures

_CHILD = textwrap.dedent("""
    import json, sys, time, logging
    from pathlib import Path
    from dpkd_lib import teacher_cache as tc
    from dpkd_lib.perf import bench
    logging.basicConfig(level=logging.WARNING)
    folder, delay = Path(sys.argv[1]), float(sys.argv[2])

    class Slow(bench.WideTeacher):
        def forward(self, *a, **kw):
            time.sleep(delay)
            return super().forward(*a, **kw)

    built = []
    ex = bench.wide_examples(600, vocab=96, prompt=5, response=20)
    cache = tc.load_or_build(folder, lambda: built.append(1) or Slow(96, 40), ex, 0, 0, meta={},
                             fmt="hidden", batch_size=8, progress=False)
    print(json.dumps({"built": len(built), "rows": cache.store.shape("hidden")[0]}))
""")


def _spawn(folder, delay):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", _CHILD, str(folder), str(delay)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_killed_build_never_looks_complete_and_is_cleaned_and_rebuilt(tmp_path):
    folder = tmp_path / "cache" / "key"
    proc = _spawn(folder, 0.2)
    tmp = folder.with_name(f"key.tmp-{proc.pid}")
    deadline = time.time() + 120
    while not (tmp / tc.SIGNALS).exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # a few batches written
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert tmp.exists() and not folder.exists()  # killed: nothing looks complete
    ex = _examples()
    cache = tc.load_or_build(folder, lambda: bench.WideTeacher(V, H), ex, 0, 0, meta={}, fmt="hidden",
                             batch_size=8, progress=False)
    assert not tmp.exists(), "the dead build's temp folder is removed when the folder is next opened"
    clean = tc.compute_signals(bench.WideTeacher(V, H), ex, 0, fmt="hidden", batch_size=8, progress=False)
    assert torch.equal(cache.store.read("hidden"), clean.store["hidden"])


def test_a_live_builds_temp_folder_is_left_alone(tmp_path):
    live = tmp_path / f"k.tmp-{os.getppid()}"
    dead = tmp_path / "k.tmp-999999999"
    live.mkdir()
    dead.mkdir()
    assert tc.clean_stale(tmp_path) == [dead]
    assert live.exists() and not dead.exists()


def test_two_runs_building_one_cache_wait_and_share_it(tmp_path):
    """Two processes start the same build at once: one builds, the other waits on the lock
    and reads its cache (no ENOTEMPTY at os.replace, no second teacher)."""
    folder = tmp_path / "cache" / "key"
    procs = [_spawn(folder, 0.05), _spawn(folder, 0.05)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-800:] for o in outs]
    results = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    assert sorted(r["built"] for r in results) == [0, 1]
    assert results[0]["rows"] == results[1]["rows"] > 0
    assert not list(folder.parent.glob("*.tmp-*"))


def test_a_full_disk_during_the_build_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    writes = {"n": 0}
    real = tc.SignalWriter.append

    def append(self, name, tensor):  # the disk fills up at the third batch
        writes["n"] += 1
        if writes["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, name, tensor)
    monkeypatch.setattr(tc.SignalWriter, "append", append)
    folder = tmp_path / "cache" / "key"
    with pytest.raises(OutOfResources) as err:
        tc.load_or_build(folder, lambda: bench.WideTeacher(V, H), _examples(), 0, 0, meta={},
                         fmt="hidden", batch_size=8, progress=False)
    msg = str(err.value)
    assert "\n" not in msg
    ex = _examples()
    rows = sum(c for _, c in tc.plan_index(ex, 8)[1].values())
    needed = (rows * H + V * H) * 4  # fp32 hidden states and head
    assert str(folder / tc.SIGNALS) in msg and f"needs {human_bytes(needed)}," in msg
    assert "free on its disk" in msg and "cache_dir" in msg
    assert sorted(p.name for p in folder.parent.iterdir()) == ["key.lock"]  # no temp folder


def test_a_disk_too_small_fails_before_the_teacher_pass(tmp_path, monkeypatch):
    passes = []

    def no_room(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "posix_fallocate", no_room)

    class Counting(bench.WideTeacher):
        def forward(self, *a, **kw):
            passes.append(1)
            return super().forward(*a, **kw)
    with pytest.raises(OutOfResources, match="no space left for the teacher cache"):
        tc.load_or_build(tmp_path / "key", lambda: Counting(V, H), _examples(), 0, 0, meta={},
                         fmt="hidden", batch_size=8, progress=False)
    assert len(passes) == 1, "the file's size is reserved after the first batch, before the rest"


def test_a_full_disk_in_a_run_fails_its_manifest_in_one_line(tmp_path, monkeypatch):
    from dpkd_lib.config import load_config
    from dpkd_lib.io import read_json
    from dpkd_lib.train import train

    def no_room(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "posix_fallocate", no_room)
    cfg = load_config(ROOT / "params/smoke/train.yaml",
                      [f"output_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}",
                       "train.teacher_mode=cache", "train.max_steps=1", "eval.splits=[]"])
    with pytest.raises(OutOfResources, match="no space left for the teacher cache"):
        train(cfg, progress=False)
    manifest = read_json(tmp_path / "run" / "manifest.json")
    assert manifest["status"] == "failed" and "no space left for the teacher cache" in manifest["error"]
    assert not list((tmp_path / "cache").glob("*.tmp-*"))
