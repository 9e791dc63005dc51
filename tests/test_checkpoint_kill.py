"""A save killed at any point never leaves a mixture or a corrupt file under the checkpoint's name,
and the next save removes what the killed ones left.

A worker process saves checkpoints in a loop, each one a distinct step ``k`` whose every part says
``k``: all weights, the optimizer's learning rate and moments, the EMA averages, the RNG state
(``torch.manual_seed(k)``), ``step`` and ``extra``. The test kills it (SIGKILL) at random points of a
save, and also right after a save has written its temporary file (the window before the rename),
then loads the checkpoint with the model, an optimizer and an EMA: it must load (checksum verified)
and every part must say the same ``k``. Workers are forked from a forkserver that has imported
torch once, so a kill costs milliseconds, not an interpreter start.
"""
import itertools
import multiprocessing
import os
import random
import time

import pytest
import torch

import transfusion_fast as tf
import transfusion_fast.checkpoint as ckpt
from transfusion_fast import ModalityConfig, Model, ModelConfig, load_checkpoint, save_checkpoint

# ~1.2 M parameters: a save takes long enough that a random kill lands inside it.
CONFIG = ModelConfig(dim=256, depth=1, n_heads=4, modalities=(ModalityConfig("image", "image", channels=1,
                                                                               patch_size=2, max_size=8),))
RANDOM_KILLS = 8
KILLS_AFTER_WRITE = 3


def _parts(k: int):
    torch.manual_seed(0)
    model = Model(CONFIG)
    opt = torch.optim.AdamW(model.parameters(), lr=1.0)
    for p in model.parameters():       # a step creates the optimizer state (no backward: the
        p.grad = torch.zeros_like(p)   # autograd engine takes seconds to start in a fresh process)
    opt.step()
    ema = tf.EMA(model, 0.5)
    return model, opt, ema


def _stamp(model, opt, ema, k: int) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(k)
    for group in opt.param_groups:
        group["lr"] = float(k)
    for state in opt.state.values():
        state["exp_avg"].fill_(k)
    for average in ema.averages:
        average.fill_(k)
    torch.manual_seed(k)


def _save_forever(path: str, first: int, conn) -> None:
    """The worker: save steps first, first + 1, ... until killed, reporting each phase."""
    torch.set_num_threads(1)
    model, opt, ema = _parts(first)
    write = ckpt._write_file

    def write_and_report(filename, tensors, metadata):
        write(filename, tensors, metadata)
        conn.send(("written", filename))

    ckpt._write_file = write_and_report
    for k in itertools.count(first):
        _stamp(model, opt, ema, k)
        conn.send(("start", k, time.perf_counter()))
        save_checkpoint(path, model, opt, step=k, extra={"k": k}, ema=ema)
        conn.send(("saved", k, time.perf_counter()))


def _check_consistent(path) -> int | None:
    """The step of the checkpoint at ``path`` (None if none was ever completed); every part must agree."""
    if not os.path.exists(path):
        return None
    model, opt, ema = _parts(0)
    _, info = load_checkpoint(path, model, opt, ema=ema)     # raises on a corrupt file
    k = info["step"]
    rng = torch.get_rng_state()
    torch.manual_seed(k)
    assert torch.equal(rng, torch.get_rng_state()), "RNG state from another save"
    assert info["extra"] == {"k": k}
    assert all(bool((p == k).all()) for p in model.parameters()), "weights from another save"
    assert all(g["lr"] == k for g in opt.param_groups), "optimizer from another save"
    assert all(bool((s["exp_avg"] == k).all()) for s in opt.state.values()), "optimizer state from another save"
    assert all(bool((a == k).all()) for a in ema.averages), "EMA from another save"
    return k


def _receive(conn, kind: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if conn.poll(max(0.0, deadline - time.monotonic())):
            message = conn.recv()
            if message[0] == kind:
                return message
    pytest.fail(f"the save worker sent no {kind!r} message in {timeout} s")


def test_killed_saves_leave_the_previous_or_the_new_checkpoint_and_the_next_save_cleans_up(tmp_path):
    ctx = multiprocessing.get_context("forkserver")
    # torch._dynamo: torch.optim imports it on first use, seconds in every fresh worker otherwise.
    ctx.set_forkserver_preload(["torch", "torch._dynamo", "transfusion_fast", __name__])
    path = str(tmp_path / "checkpoint.safetensors")
    rng = random.Random(19)
    save_seconds = None
    steps_seen = set()
    plan = ["random"] * RANDOM_KILLS + ["after write"] * (KILLS_AFTER_WRITE - 1)
    rng.shuffle(plan)
    plan.append("after write")          # the last kill surely leaves a temporary file
    for trial, how in enumerate(plan):
        receiver, sender = ctx.Pipe(duplex=False)
        worker = ctx.Process(target=_save_forever, args=(path, 1000 * (trial + 1), sender), daemon=True)
        worker.start()
        sender.close()
        try:
            if save_seconds is None:                          # measure one whole save first
                _, _, started = _receive(receiver, "start")
                _, _, finished = _receive(receiver, "saved")
                save_seconds = finished - started
            if how == "random":
                _receive(receiver, "start")
                time.sleep(rng.uniform(0.0, 1.2 * save_seconds))
            else:
                _receive(receiver, "written")
        finally:
            worker.kill()
            worker.join()
        assert worker.exitcode == -9
        k = _check_consistent(path)
        if k is not None:
            steps_seen.add(k)

    leftovers = [n for n in os.listdir(tmp_path) if n != "checkpoint.safetensors"]
    assert leftovers                                             # a killed save left its temporary file
    assert all(n.startswith(".checkpoint.safetensors.saving.") and n.endswith(".tmp") for n in leftovers)
    assert steps_seen, "no save completed before a kill"

    model, opt, ema = _parts(0)
    _stamp(model, opt, ema, 7)
    save_checkpoint(path, model, opt, step=7, extra={"k": 7}, ema=ema)
    assert os.listdir(tmp_path) == ["checkpoint.safetensors"]    # the next save removed them
    assert _check_consistent(path) == 7
