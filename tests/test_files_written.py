"""How the three files write: atomically, cleaning up after killed runs, with ordinary file modes.

    Kill -9     a run killed mid-save leaves the previous good checkpoint intact; the next save removes
                the temporary it left behind (and keeps a live process's)
    Modes       nanogpt2.py, imagegpt.py and convert_tf.py write files as a plain open() does: the umask
                decides (0644 under 022, 0640 under 027)
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import convert_tf
import imagegpt
import nanogpt2

ROOT = Path(__file__).resolve().parent.parent
MODULES = {"nanogpt2": nanogpt2, "imagegpt": imagegpt}


def tiny_model(module, seed):
    torch.manual_seed(seed)
    if module is nanogpt2:
        return nanogpt2.GPT2LMHeadModel(nanogpt2.GPT2Config(n_layer=1, n_head=2, n_embd=8, n_positions=8,
                                                            vocab_size=16))
    model = imagegpt.ImageGPTForCausalImageModeling(imagegpt.ImageGPTConfig(n_layer=1, n_head=2, n_embd=8, n_positions=4,
                                                                            vocab_size=5))
    model.palette = torch.rand(4, 3) * 2 - 1
    return model


def dead_pid():
    """The id of a process that has exited (and been reaped), so no process has it."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


KILLED_MID_SAVE = """
import os, signal, sys, torch
sys.path.insert(0, {root!r})
import {name} as m
def killed(*args):  # the new file is written, the rename not yet done: the worst moment to be killed
    os.kill(os.getpid(), signal.SIGKILL)
os.replace = killed
torch.manual_seed(1)
m.save_safetensors({{"w": torch.ones(64, 64)}}, {path!r})
"""


@pytest.mark.parametrize("name", MODULES)
def test_kill_mid_save_keeps_the_old_file_and_the_next_save_removes_the_leftover(tmp_path, name):
    module = MODULES[name]
    path = tmp_path / "model.safetensors"
    module.save_safetensors({"w": torch.zeros(4)}, path)
    child = subprocess.run([sys.executable, "-c", KILLED_MID_SAVE.format(root=str(ROOT), name=name, path=str(path))],
                           timeout=120)
    assert child.returncode == -9
    leftovers = [p for p in tmp_path.iterdir() if p != path]
    assert leftovers, "the killed run left no temporary: the test did not kill it mid-save"
    assert torch.equal(module.load_safetensors(path)["w"], torch.zeros(4))  # the previous good file
    module.save_safetensors({"w": torch.ones(3)}, path)
    assert sorted(tmp_path.iterdir()) == [path]  # the leftover is gone, and nothing else was left
    assert torch.equal(module.load_safetensors(path)["w"], torch.ones(3))


@pytest.mark.parametrize("name", MODULES)
def test_save_pretrained_removes_dead_runs_temporaries_and_keeps_live_ones(tmp_path, name):
    module = MODULES[name]
    model = tiny_model(module, 0)
    model.save_pretrained(tmp_path)
    good = sorted(p.name for p in tmp_path.iterdir())
    dead, live = dead_pid(), os.getppid()  # our parent outlives this test
    for written in good:
        (tmp_path / f"{written}.tmp{dead}").write_bytes(b"half a file")
    (tmp_path / f"config.json.tmp{live}").write_bytes(b"still being written")
    (tmp_path / "notes.tmp1").write_text("not ours")  # only temporaries of the files we write are touched
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(good + [f"config.json.tmp{live}", "notes.tmp1"])
    assert type(model).from_pretrained(tmp_path) is not None


def test_convert_removes_a_killed_runs_temporary_folder(tmp_path):
    dead, live = dead_pid(), os.getppid()
    for pid in (dead, live):
        (tmp_path / f".out.tmp{pid}").mkdir()
        (tmp_path / f".out.tmp{pid}" / "model.safetensors").write_bytes(b"half")
    convert_tf.convert(ROOT / "tests" / "fixtures" / "tf" / "gpt2", tmp_path / "out", log=lambda message: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".out.tmp{live}", "out"]


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def modes(folder):
    return {p.name: p.stat().st_mode & 0o777 for p in Path(folder).iterdir()}


@pytest.mark.parametrize("name", MODULES)
def test_saved_files_get_the_mode_the_umask_gives(tmp_path, name, umask):
    module = MODULES[name]
    tiny_model(module, 0).save_pretrained(tmp_path / "model")
    written = modes(tmp_path / "model")
    assert len(written) == (2 if module is nanogpt2 else 4)  # imagegpt adds the palette, in two layouts
    assert written == {n: 0o666 & ~umask for n in written}
    if module is imagegpt:
        imagegpt.write_png(tmp_path / "image.png", torch.zeros(2, 2, 3, dtype=torch.uint8))
        assert modes(tmp_path)["image.png"] == 0o666 & ~umask


def test_converted_folder_gets_the_modes_the_umask_gives(tmp_path, umask):
    convert_tf.convert(ROOT / "tests" / "fixtures" / "tf" / "gpt2", tmp_path / "out", log=lambda message: None)
    assert modes(tmp_path) == {"out": 0o777 & ~umask}
    written = modes(tmp_path / "out")
    assert "model.safetensors" in written and written == {n: 0o666 & ~umask for n in written}
