"""Checkpoint files: the bytes are on disk before the name points at them, the checkpoint before the pointer, a
pointer to a missing file is an error, a bare state dict is returned whole, and the saved RNG state restores every
generator."""

import os
import random

import numpy as np
import pytest
import torch

import detectors.engine.checkpoint as ckpt
from detectors.engine.checkpoint import last_checkpoint, load_checkpoint, load_model_weights, rng_state, save_checkpoint


def _record_file_calls(monkeypatch):
    """Records os.fsync (with the path of the descriptor) and os.replace, in call order, while still doing them."""
    calls = []
    fsync, replace = os.fsync, os.replace

    def spy_fsync(fd):
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def spy_replace(src, dst):
        calls.append(("replace", os.fspath(src), os.fspath(dst)))
        replace(src, dst)

    monkeypatch.setattr(ckpt.os, "fsync", spy_fsync)
    monkeypatch.setattr(ckpt.os, "replace", spy_replace)
    return calls


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name a descriptor's file")
def test_write_atomically_syncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    calls = _record_file_calls(monkeypatch)
    target = tmp_path / "x.json"
    ckpt.write_atomically(target, lambda tmp: tmp.write_text("new"))
    tmp = str(tmp_path / "x.json.tmp")
    assert calls == [("fsync", tmp), ("replace", tmp, str(target)), ("fsync", str(tmp_path))]
    assert target.read_text() == "new" and not (tmp_path / "x.json.tmp").exists()


def test_a_failed_write_or_rename_leaves_no_temporary(tmp_path):
    """The temporary beside the target is removed when writing it fails part-way or the rename does (the target
    is a folder), and the error is the caller's."""
    def write_then_fail(tmp):
        tmp.write_text("part")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ckpt.write_atomically(tmp_path / "x.pth", write_then_fail)
    (tmp_path / "folder.pth").mkdir()
    with pytest.raises(IsADirectoryError):
        ckpt.write_atomically(tmp_path / "folder.pth", lambda tmp: tmp.write_text("whole"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.pth"]


def test_the_checkpoint_is_complete_before_the_pointer_names_it(tmp_path, monkeypatch):
    """A crash between the two writes must leave the pointer at the previous checkpoint, never at a missing one."""
    save_checkpoint(tmp_path, "model_0000001.pth", {"iteration": 1})
    renamed = []
    replace = os.replace

    def crash_on_second_rename(src, dst):
        renamed.append(os.path.basename(dst))
        if len(renamed) == 2:
            raise KeyboardInterrupt
        replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", crash_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, "model_0000002.pth", {"iteration": 2})
    assert renamed == ["model_0000002.pth", "last_checkpoint"]
    assert last_checkpoint(tmp_path) == tmp_path / "model_0000001.pth"


def test_a_pointer_to_a_missing_checkpoint_is_an_error(tmp_path):
    assert last_checkpoint(tmp_path) is None
    (tmp_path / "last_checkpoint").write_text("model_0000005.pth\n")
    with pytest.raises(FileNotFoundError, match="names .*model_0000005.pth, which does not exist"):
        last_checkpoint(tmp_path)
    torch.save({"iteration": 5}, tmp_path / "model_0000005.pth")
    assert last_checkpoint(tmp_path) == tmp_path / "model_0000005.pth"  # the newline of a hand-written pointer too
    # an empty pointer would name the folder itself: said as it is, as is a pointer to a folder
    (tmp_path / "last_checkpoint").write_text("\n")
    with pytest.raises(FileNotFoundError, match="last_checkpoint is empty: it names no checkpoint"):
        last_checkpoint(tmp_path)
    (tmp_path / "model_0000006.pth").mkdir()
    (tmp_path / "last_checkpoint").write_text("model_0000006.pth")
    with pytest.raises(FileNotFoundError, match="names .*model_0000006.pth, which is a folder"):
        last_checkpoint(tmp_path)


def test_a_bare_state_dict_with_a_tensor_named_model_is_returned_whole(tmp_path):
    """Only a dict under "model" makes a training checkpoint; a state dict may hold a tensor of that name."""
    state = {"model": torch.ones(2), "head.weight": torch.zeros(3)}
    torch.save(state, tmp_path / "w.pth")
    loaded, meta = load_model_weights(tmp_path / "w.pth")
    assert set(loaded) == {"model", "head.weight"} and meta == {}
    torch.save({"model": {"a": torch.ones(1)}, "meta": {"num_classes": 3}}, tmp_path / "c.pth")
    loaded, meta = load_model_weights(tmp_path / "c.pth")
    assert set(loaded) == {"a"} and meta == {"num_classes": 3}


@pytest.fixture
def global_generators_kept():
    """The test reseeds the global generators; later tests in the process find them as they were."""
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    yield
    torch.set_rng_state(states[0])
    np.random.set_state(states[1])
    random.setstate(states[2])


def test_the_rng_state_restores_every_generator(tmp_path, global_generators_kept):
    """torch, numpy (with a cached Gaussian: one normal() draw leaves the second of its pair) and Python's random draw
    the same numbers after a checkpoint's RNG state is restored as right after it was taken."""
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.normal()  # numpy's legacy generator now holds a cached Gaussian
    save_checkpoint(tmp_path, "c.pth", {"rng": rng_state()})

    def draws():
        return torch.rand(3).tolist(), np.random.normal(size=3).tolist(), np.random.rand(2).tolist(), random.random()

    expected = draws()
    torch.manual_seed(7)
    np.random.seed(8)
    random.seed(9)
    ckpt.set_rng_state(load_checkpoint(tmp_path / "c.pth")["rng"])
    assert draws() == expected
