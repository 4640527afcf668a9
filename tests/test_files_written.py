"""How the three files write: atomically, cleaning up after killed runs, with ordinary file modes.

    Kill -9     a run killed mid-save leaves the previous good checkpoint intact; the next save removes
                the temporary it left behind (and keeps a live process's)
    Power cut   a file is synced to the disk before it is renamed into place, and its folder after; log.csv is
                synced at each checkpoint
    Full disk   a checkpoint that does not fit (EFBIG under a file-size limit, ENOSPC) stops the run with one
                line naming the file; every file of the previous checkpoint is as it was, and no temporary is left
    Modes       nanogpt2.py, imagegpt.py and convert_tf.py write files as a plain open() does: the umask
                decides (0644 under 022, 0640 under 027)
"""

import errno
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


def opened_path(fd):
    return os.readlink(f"/proc/self/fd/{fd}")


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names an open file through /proc (Linux)")
@pytest.mark.parametrize("name", MODULES)
def test_a_file_is_synced_before_its_rename_and_its_folder_after(tmp_path, monkeypatch, name):
    events, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", opened_path(fd))), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))), real_replace(a, b)))
    path = tmp_path / "config.json"
    MODULES[name]._write_atomically(path, b"{}")
    tmp = f"{path}.tmp{os.getpid()}"
    assert events == [("fsync", tmp), ("replace", tmp, str(path)), ("fsync", str(tmp_path))]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names an open file through /proc (Linux)")
@pytest.mark.parametrize("name", MODULES)
def test_the_log_is_synced_before_each_checkpoint(tmp_path, monkeypatch, name):
    """Resume keeps log.csv's rows up to the checkpoint: after a power cut they must be there as the checkpoint is."""
    events, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(opened_path(fd)), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(f"renamed to {b}"), real_replace(a, b)))
    out = tmp_path / "run"
    assert MODULES[name].main(["train", *TRAIN_TINY[name], "--max-steps", "4", "--save-every", "2", "--out",
                               str(out)]) == 0
    log, state = str(out / "log.csv"), f"renamed to {out / 'training_state.pt'}"
    checkpoints = [i for i, event in enumerate(events) if event == state]
    assert len(checkpoints) >= 2  # steps 2 and 4 (and the last, again)
    for previous, i in zip([-1] + checkpoints, checkpoints):
        assert log in events[previous + 1 : i], f"log.csv not synced before checkpoint {checkpoints.index(i) + 1}"


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names an open file through /proc (Linux)")
def test_a_converted_folder_is_synced_before_its_rename_and_its_parent_after(tmp_path, monkeypatch):
    events, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", opened_path(fd))), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))), real_replace(a, b)))
    out = tmp_path / "out"
    convert_tf.convert(ROOT / "tests" / "fixtures" / "tf" / "gpt2", out, log=lambda message: None)
    tmp = str(tmp_path / f".out.tmp{os.getpid()}")
    written = sorted(os.path.join(tmp, p.name) for p in out.iterdir())
    assert "model.safetensors" in {p.name for p in out.iterdir()}
    assert sorted(events[:-3]) == [("fsync", path) for path in written]  # every file, then the folder, then
    assert events[-3:] == [("fsync", tmp), ("replace", tmp, str(out)), ("fsync", str(tmp_path))]  # its new name


TRAIN_TINY = {"nanogpt2": ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--digits", "1", "--batch-size", "8"],
              "imagegpt": ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--n-px", "6", "--batch-size", "8",
                           "--eval-batches", "2", "--num-samples", "4", "--sample-every", "0", "--time-budget", "0"]}

def kept_whole(path):
    """Whether path is a file of the checkpoint (log.csv goes on growing; sample grids are written at the end)."""
    return path.name != "log.csv" and not path.name.startswith("samples")


FULL_DISK = """
import resource, signal, sys
sys.path.insert(0, {root!r})
import {name} as m
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
sys.exit(m.main({argv!r}))
"""


@pytest.mark.parametrize("name", MODULES)
def test_a_checkpoint_that_does_not_fit_keeps_the_previous_one_whole_and_says_which_file(tmp_path, name):
    """A full disk, honestly: the next checkpoint is saved in a process whose files may not grow past twice the
    size of model.safetensors. The model would fit; training_state.pt (the weights and AdamW's two moments) does
    not, and its write fails with EFBIG, as on a disk that is full. Written first, the model's files would
    already have been replaced."""
    module, out = MODULES[name], tmp_path / "run"
    assert module.main(["train", *TRAIN_TINY[name], "--max-steps", "2", "--save-every", "2", "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if kept_whole(p)}
    limit = 2 * (out / "model.safetensors").stat().st_size
    assert (out / "training_state.pt").stat().st_size > limit
    argv = ["train", "--resume", str(out), "--max-steps", "4"]
    child = subprocess.run([sys.executable, "-c", FULL_DISK.format(root=str(ROOT), name=name, limit=limit, argv=argv)],
                           capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert child.returncode == 2, child.stderr
    assert child.stderr == (
        f"{name}.py: error: the checkpoint of step 4 was not saved in {out}: could not write "
        f"{out / 'training_state.pt'} (File too large); it is as it was before, and no part of the new one is left; "
        f"the one of step 2 is kept there whole, and --resume {out} continues from it\n")
    assert {p.name: p.read_bytes() for p in out.iterdir() if kept_whole(p)} == before  # no temporary either
    assert module.main(["train", "--resume", str(out), "--max-steps", "4"]) == 0  # with room again, it goes on
    assert torch.load(out / "training_state.pt", weights_only=True)["step"] == 4


@pytest.mark.parametrize("name", MODULES)
def test_a_full_disk_at_the_model_file_after_the_state_fit_keeps_the_previous_checkpoint_too(tmp_path, monkeypatch,
                                                                                            capsys, name):
    """The state goes first (the largest file); the model's files follow, before the state is renamed. A disk
    that fills up between them still leaves every file of the previous checkpoint as it was."""
    module, out = MODULES[name], tmp_path / "run"
    assert module.main(["train", *TRAIN_TINY[name], "--max-steps", "2", "--save-every", "2", "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if kept_whole(p)}

    def no_space(*args, **kwargs):  # called inside save_safetensors' write of model.safetensors
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(module, "safetensors_header", no_space)
    assert module.main(["train", "--resume", str(out), "--max-steps", "4"]) == 2
    err = capsys.readouterr().err
    assert f"could not write {out / 'model.safetensors'} (No space left on device)" in err and \
        "the one of step 2 is kept there whole" in err and len(err.splitlines()) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir() if kept_whole(p)} == before
    assert torch.load(out / "training_state.pt", weights_only=True)["step"] == 2


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
    assert len(written) == (3 if module is nanogpt2 else 5)  # generation_config.json; imagegpt adds the palette
    assert written == {n: 0o666 & ~umask for n in written}
    if module is imagegpt:
        imagegpt.write_png(tmp_path / "image.png", torch.zeros(2, 2, 3, dtype=torch.uint8))
        assert modes(tmp_path)["image.png"] == 0o666 & ~umask


def test_converted_folder_gets_the_modes_the_umask_gives(tmp_path, umask):
    convert_tf.convert(ROOT / "tests" / "fixtures" / "tf" / "gpt2", tmp_path / "out", log=lambda message: None)
    assert modes(tmp_path) == {"out": 0o777 & ~umask}
    written = modes(tmp_path / "out")
    assert "model.safetensors" in written and written == {n: 0o666 & ~umask for n in written}
