"""The `lightning` console script prints project errors as one line."""

import io
import os
import subprocess
import sys
import tarfile
import types
from pathlib import Path

import pytest
import torch
from jsonargparse import Namespace
from PIL import Image

from lvm.cli import CLI, check_start, main
from lvm.errors import ConfigError
from lvm.train import main as dry_run
from test_data import write_sentence_shards


def test_invalid_config_is_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", "configs/lvm_tiny.yaml", "--model.lr", "-1", "--data.train_shards", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: model.lr: must be > 0, got -1.0"
    shards = write_sentence_shards(tmp_path / "sentences", shards=1, sentences=4)
    assert not any("Traceback" in line for line in err)
    # and what only the trainer and data settings show, which it printed a normal summary for (review 42 #5)
    for args, message in ((["--model.warmup_steps", "5000"], "model.warmup_steps: 5000 must be below trainer.max_steps"),
                          (["--data.seq_len", "8192"], "data.seq_len: 8192 exceeds the model's context"),
                          (["--trainer.accumulate_grad_batches", "0"], "trainer.accumulate_grad_batches: must be >= 1")):
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "-c", "configs/lvm_tiny.yaml", "--data.train_shards", str(shards), *args])
        assert exit_info.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {message}")


@pytest.mark.parametrize(("args", "message"), [
    (["--trainer.max_steps", "-5"], "trainer: `max_steps` must be a non-negative integer or -1"),
    (["--trainer.num_nodes", "0"], "trainer: `num_nodes` must be a positive integer, but got 0."),
    (["--trainer.strategy", "nope"], "trainer: You selected an invalid strategy name: `strategy='nope'`"),
    (["--trainer.devices", "abc"], "trainer: `devices` selected with `CPUAccelerator` should be an int > 0."),
    (["--trainer.val_check_interval", "0"], "trainer.val_check_interval: must be > 0 (a number of batches)"),
    (["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint", "--trainer.callbacks.every_n_train_steps",
      "-5"], "Invalid value for every_n_train_steps=-5. Must be >= 0"),  # Lightning's MisconfigurationException
])
def test_trainer_values_lightning_refuses_are_one_line_before_any_step(args, message, tmp_path, monkeypatch, capsys):
    """They were 28-54 line tracebacks; `val_check_interval 0` divided by zero after step 1 and left a checkpoint that
    refused the corrected rerun (review 61 #1)."""
    shards = write_sentence_shards(tmp_path / "sentences", shards=1, sentences=4)
    monkeypatch.chdir(tmp_path)
    config = str(Path(__file__).parents[1] / "configs" / "lvm_tiny.yaml")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", config, "--data.train_shards", str(shards), *args])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {message}")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--model.lrr", "1e-3"], "model.lrr: not an option of lvm.train.LVMModule"),
    (["--seed_everything", "1e3"], "seed_everything: expected a bool or int, got 1e3"),  # not "a bool, got 1000.0"
    (["--data.batch_size", "eight"], "data.batch_size: expected an int, got eight"),
    (["--model.size", "huge"], "model.size: expected one of 'tiny', '300m', '600m', '1b', '3b', '7b', got huge"),
    (["--trainer.max_stepz", "3"], "unrecognized arguments: --trainer.max_stepz 3"),
    (["--trainer.max_epochs", "1.5"], "trainer.max_epochs: expected an int or null, got 1.5"),  # a Union (review 57 #5)
    (["--model", "lvm.train.LVMModul"], "model: no class lvm.train.LVMModul (has no attribute 'LVMModul')"),
    (["--model.overrides", "abc"], "model.overrides: expected a dict or null, got abc"),  # review 60 #2, #3
    (["--trainer.callbacks+=ModelCheckpoint"], "trainer.callbacks: Multiple subclasses with name ModelCheckpoint. Give "
     "the full class path to avoid ambiguity: lightning.pytorch.callbacks.ModelCheckpoint, lvm.callbacks.ModelCheckpoint."),
    (["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint", "--trainer.callbacks.every_n_train_steps", "abc"],
     "trainer.callbacks.every_n_train_steps: expected an int or null, got abc"),
])
def test_a_mistyped_key_or_value_is_one_line_with_its_reason(tmp_path, capsys, args, message):
    """jsonargparse printed the 47-line usage and a dump of its Union checks around the reason (review 55 #4)."""
    for run, prog in ((lambda a: main(["fit", *a]), "python -m lvm.cli fit"), (dry_run, "python -m lvm.train")):
        with pytest.raises(SystemExit) as exit_info:
            run(["-c", "configs/lvm_tiny.yaml", "--data.train_shards", str(tmp_path), *args])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err == f"error: {message} (`{prog} --help` lists the options)\n"


def test_the_dry_run_runs_as_its_module(tmp_path):
    """As a user runs it: under `python -m lvm.train` the file's classes are __main__'s, and a check by class refused
    every LVM config (the in-process tests import it as lvm.train and could not see it)."""
    root = Path(__file__).parents[1]
    done = subprocess.run([sys.executable, "-m", "lvm.train", "-c", str(root / "configs/lvm_tiny.yaml")], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("model      tiny: dim 128, mlp 352, layers 4, heads 4")
    done = subprocess.run([sys.executable, "-m", "lvm.train", "-c", str(root / "configs/lvm_tiny.yaml"),
                           "--data.batch_size", "0"], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(root)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.splitlines()[-1] == "error: data.batch_size: must be >= 1, got 0"


def test_the_dry_run_of_a_tokenizer_config_is_one_line(capsys):
    """It was an AttributeError traceback: the summary reads an LVM's shape (review 61 #3, review 62 #6)."""
    with pytest.raises(SystemExit) as exit_info:
        dry_run(["-c", "configs/vqgan_tiny.yaml"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: model: python -m lvm.train summarises LVM configs (lvm.train.LVMModule); this one trains "
        "tokenizer.training.VQGANTraining: run it with lightning fit")


@pytest.mark.parametrize("seed", [2**32, -1])
def test_a_seed_past_numpys_is_one_line_in_the_fit_and_the_dry_run(seed, tmp_path, capsys):
    """`--seed_everything 4294967296` was Lightning's ValueError traceback (review 56 #2), in the dry run too."""
    for run in (lambda a: main(["fit", *a]), dry_run):
        with pytest.raises(SystemExit) as exit_info:
            run(["-c", "configs/lvm_tiny.yaml", "--data.train_shards", str(tmp_path), "--seed_everything", str(seed)])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1] == (
            f"error: seed_everything: {seed} is not in [0, 2**32) (the seeds numpy and Lightning take)")


def test_impossible_tokenizer_architecture_is_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", "lvm/demo/configs/vqgan.yaml", "--model.tokenizer.hidden_channels", "16",
              "--data.train", str(tmp_path), "--data.val", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: VQGANConfig: hidden_channels * channel_mult must be divisible by 32 (GroupNorm(32)); got 16 * 1"
    assert not any("Traceback" in line for line in err)


def test_dry_run_config_error_is_one_line(capsys):
    """`python -m lvm.train -c CONFIG` (the summary without training) reports config errors as `lightning fit` does."""
    with pytest.raises(SystemExit) as exit_info:
        dry_run(["-c", "configs/lvm_300m.yaml", "--model.lr", "-1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: model.lr: must be > 0, got -1.0"
    assert not any("Traceback" in line for line in err)
    # and what only the trainer and data settings show, which it printed a normal summary for (review 42 #5)
    for args, message in ((["--model.warmup_steps", "5000"], "model.warmup_steps: 5000 must be below trainer.max_steps"),
                          (["--data.seq_len", "8192"], "data.seq_len: 8192 exceeds the model's context"),
                          (["--trainer.accumulate_grad_batches", "0"], "trainer.accumulate_grad_batches: must be >= 1")):
        with pytest.raises(SystemExit) as exit_info:
            dry_run(["-c", "configs/lvm_tiny.yaml", *args])
        assert exit_info.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {message}")


@pytest.mark.parametrize(("train", "problem"), [
    ("nothere", "no such file or directory"),
    ("empty", "no image files (.bmp, .gif"),
    ("tokens/{0..1}.tar", "no .tar shards found (no such file or directory)"),  # names tokens/1.tar
    ("tokens", "holds no image member (.bmp, .gif, .jpeg, .jpg, .pbm, .pgm, .png, .pnm, .ppm, .tif, .tiff, .webp): token or sentence shards?"),
    ("text.tar", "not a readable tar shard"),
    ("broken", "no readable image among its 2 image files"),
])
def test_missing_tokenizer_training_data_is_one_line_error(tmp_path, capsys, train, problem):
    """An image folder without (readable) images, or shards that give no image: webdataset would wait forever."""
    (tmp_path / "tokens").mkdir()
    with tarfile.open(tmp_path / "tokens" / "0.tar", "w") as tar:  # a token shard: no image member
        member = tarfile.TarInfo("000000.tokens.npy")
        member.size = 4
        tar.addfile(member, io.BytesIO(b"\x00" * 4))
    (tmp_path / "text.tar").write_text("not a tar\n" * 100)
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    for name in ("a.png", "b.jpg"):
        (tmp_path / "broken" / name).write_bytes(b"not an image")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", "configs/vqgan_tiny.yaml", f"--data.init_args.train={tmp_path / train}",
              f"--data.init_args.val={tmp_path / train}", f"--trainer.default_root_dir={tmp_path / 'run'}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    where = tmp_path / {"tokens": "tokens/0.tar", "tokens/{0..1}.tar": "tokens/1.tar"}.get(train, train)
    assert err[-1].startswith(f"error: {where}: {problem}")
    assert not any("Traceback" in line for line in err)


def test_bad_ckpt_path_is_one_line_error(tmp_path, capsys):
    """Read before anything is built (memory-mapped: only the hyperparameters are needed then)."""
    (tmp_path / "empty.ckpt").write_bytes(b"")
    torch.save({"hyper_parameters": {"_class_path": "tokenizer.training.VQGANTraining"}, "state_dict": {}},
               tmp_path / "vqgan.ckpt")
    torch.save(torch.zeros(3), tmp_path / "tensor.ckpt")
    torch.save({"hyper_parameters": ["lr", 0.1], "state_dict": {}}, tmp_path / "list.ckpt")
    cases = [
        ("list.ckpt", f"--ckpt_path: {tmp_path / 'list.ckpt'} is no Lightning checkpoint (no hyper_parameters mapping)"),
        ("empty.ckpt", f"{tmp_path / 'empty.ckpt'}: corrupt or not a PyTorch checkpoint"),
        ("tensor.ckpt", f"--ckpt_path: {tmp_path / 'tensor.ckpt'} is no Lightning checkpoint (no state_dict)"),
        (".", f"--ckpt_path: {tmp_path / '.'} is a folder but no sharded checkpoint; give a .ckpt file (or 'last')"),
        ("vqgan.ckpt", f"--ckpt_path: {tmp_path / 'vqgan.ckpt'} was saved by tokenizer.training.VQGANTraining; "
                       "this config trains lvm.train.LVMModule"),
    ]
    for name, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "-c", "configs/lvm_tiny.yaml", "--data.train_shards", str(tmp_path),
                  f"--trainer.default_root_dir={tmp_path / 'run'}", "--ckpt_path", str(tmp_path / name)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"error: {message}"), err[-1]
        assert not any("Traceback" in line for line in err)


def test_ckpt_path_keeps_the_model_settings_of_the_command_line(tmp_path):
    """A run resumed from a named file trains with the yaml's and the command line's settings, as `--ckpt_path last`
    does: Lightning's own step gave the checkpoint's precedence, so a lower --model.lr after a NaN stop did nothing."""
    torch.save({"hyper_parameters": {"_class_path": "lvm.train.LVMModule", "size": "tiny", "lr": 0.0123,
                                     "_instantiator": "lightning.pytorch.cli.instantiate_module"},
                "state_dict": {}}, tmp_path / "run.ckpt")
    parsed = {}

    class Parsed(Exception):
        pass

    class Probe(CLI):
        def before_instantiate_classes(self) -> None:
            parsed.update(self.config["fit"]["model"]["init_args"])
            raise Parsed

    with pytest.raises(Parsed):
        Probe(subclass_mode_model=True, subclass_mode_data=True, args=[
            "fit", "-c", "configs/lvm_tiny.yaml", "--data.train_shards", str(tmp_path), "--model.min_lr", "1e-5",
            "--ckpt_path", str(tmp_path / "run.ckpt")])
    assert parsed["lr"] == 1e-3 and parsed["min_lr"] == 1e-5  # the yaml's, and the command line's


@pytest.mark.parametrize("setting, problem", [
    ("--data.init_args.image_size=32", "data.image_size: 32, but model.tokenizer.resolution is 64"),
    ("--data.init_args.resize=center_crop", "data.resize: center_crop, but model.tokenizer.resize is stretch")])
def test_tokenizer_images_prepared_otherwise_than_it_encodes_are_refused(tmp_path, capsys, setting, problem):
    """The checkpoint records the resolution and resize every later user prepares images by: training at another
    size, or on crops for a tokenizer that will encode squeezed images, is a mistake."""
    (tmp_path / "img").mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (40, 40)).save(tmp_path / "img" / name)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", "configs/vqgan_tiny.yaml", f"--data.init_args.train={tmp_path / 'img'}",
              f"--data.init_args.val={tmp_path / 'img'}", setting, f"--trainer.default_root_dir={tmp_path / 'run'}"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {problem}; set both to the same value"
    # refused in the data's setup, after Lightning made the logger's folder: none is left (review 61)
    assert [path.name for path in (tmp_path / "run").rglob("*")] == ["lightning_logs"]


def test_a_path_error_while_training_is_one_line_as_in_every_command(tmp_path, capsys):
    """A log folder under a file was a NotADirectoryError traceback from Lightning's logger, though every `python -m`
    command says it in one line (review 56 #1): both use common.errors.one_line."""
    (tmp_path / "img").mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (64, 64)).save(tmp_path / "img" / name)
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", "configs/vqgan_tiny.yaml", f"--data.init_args.train={tmp_path / 'img'}",
              f"--data.init_args.val={tmp_path / 'img'}", f"--trainer.default_root_dir={tmp_path / 'file' / 'run'}",
              "--trainer.max_steps=1"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'file' / 'run'}")


def test_resume_last_follows_lightnings_rule_over_every_checkpointer(tmp_path):
    """`--ckpt_path last` takes the newest last*.ckpt of any ModelCheckpoint: a second checkpointer keeping the best
    checkpoints and no last was refused, and so was Lightning's versioned `last-v1.ckpt` (review 57 #2)."""
    periodic, best = tmp_path / "checkpoints", tmp_path / "best"
    for folder, names in ((periodic, ["step=00000002.ckpt", "last.ckpt"]), (best, ["best-step=00000001.ckpt"])):
        folder.mkdir()
        for name in names:
            (folder / name).write_bytes(b"")

    def config(ckpt_path: str | None) -> Namespace:
        callbacks = [Namespace(class_path="lvm.callbacks.ModelCheckpoint", init_args=Namespace(dirpath=str(periodic), save_last="link")),
                     Namespace(class_path="lvm.callbacks.ModelCheckpoint", init_args=Namespace(dirpath=str(best), monitor="x"))]
        return Namespace(trainer=Namespace(callbacks=callbacks), ckpt_path=ckpt_path)

    check_start(config("last"))
    (periodic / "last.ckpt").rename(periodic / "last-v1.ckpt")
    check_start(config("last"))
    (periodic / "last-v1.ckpt").unlink()
    with pytest.raises(ConfigError, match=f"--ckpt_path last: {periodic} holds checkpoints but no last.ckpt .* "
                                          f"--ckpt_path {periodic / 'step=00000002.ckpt'}$"):
        check_start(config("last"))
    with pytest.raises(ConfigError, match="holds the checkpoints of an earlier run"):
        check_start(config(None))


def test_a_sharded_checkpoint_folder_is_left_to_lightning(tmp_path, capsys):
    """save_distributed_checkpoint writes folders of shards (with .metadata): --ckpt_path must still take them."""
    (tmp_path / "step=100.ckpt").mkdir()
    (tmp_path / "step=100.ckpt" / ".metadata").write_bytes(b"")
    parsed = types.SimpleNamespace(config={"subcommand": "fit", "fit": {"ckpt_path": str(tmp_path / "step=100.ckpt")}})
    CLI._parse_ckpt_path(parsed)  # no refusal, nothing read: Lightning loads the shards itself
    parsed.config["fit"]["ckpt_path"] = str(tmp_path)  # a folder of anything else is refused
    with pytest.raises(ConfigError, match="is a folder but no sharded checkpoint"):
        CLI._parse_ckpt_path(parsed)



def test_an_optimizer_of_the_cli_is_refused_by_the_fit_and_the_dry_run_alike(tmp_path, capsys):
    """LightningCLI offered --optimizer and --lr_scheduler: the dry run reported AdamW and `lightning fit` crashed with
    "optimizer got an empty parameter list" (review 49 #2). LVMModule builds its own groups and schedule."""
    for run, args in ((main, ["fit", "--data.train_shards", str(tmp_path)]), (dry_run, [])):
        with pytest.raises(SystemExit) as exit_info:
            run([*args[:1], "-c", "configs/lvm_tiny.yaml", *args[1:], "--optimizer", "torch.optim.SGD"])
        assert exit_info.value.code == 2
        assert "nrecognized arguments: --optimizer torch.optim.SGD" in capsys.readouterr().err
    dry_run(["-c", "configs/lvm_300m.yaml"])
    assert "weight decay 0.1 (matrices; norms and embedding 0)" in capsys.readouterr().out


@pytest.mark.parametrize(("ckpt_path", "message"), [
    ("", "--ckpt_path: empty; give 'last' or a .ckpt file, or leave it out to start anew"),
    ("hpc", "--ckpt_path hpc: runs/lvm_tiny holds no hpc_ckpt_*.ckpt (Lightning saves one when SLURM sends SIGUSR1"),
])
def test_an_empty_or_hpc_ckpt_path_without_its_checkpoint_is_one_line(ckpt_path, message, tmp_path, monkeypatch, capsys):
    """Both were 29-line ValueError tracebacks; an empty one is what `--ckpt_path "$CKPT"` gives with the variable
    unset (review 61 #6)."""
    shards = write_sentence_shards(tmp_path / "sentences", shards=1, sentences=4)
    monkeypatch.chdir(tmp_path)
    config = str(Path(__file__).parents[1] / "configs" / "lvm_tiny.yaml")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", config, "--data.train_shards", str(shards), "--ckpt_path", ckpt_path])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {message}")


@pytest.mark.parametrize(("args", "message"), [
    ([], "lightning validate: give --ckpt_path ('last' or a .ckpt file); without one it validates the model's fresh "
         "random weights"),
    (["--ckpt_path", "last"], "--ckpt_path last: no last*.ckpt in runs/lvm_tiny/checkpoints; give a .ckpt file"),
    (["--ckpt_path", ""], "--ckpt_path: empty; give 'last' or a .ckpt file"),
])
def test_validate_without_a_checkpoint_is_one_line(args, message, tmp_path, monkeypatch, capsys):
    """Lightning validated the fresh random weights (val/loss 9.05) and exited 0 (review 64 #4)."""
    shards = write_sentence_shards(tmp_path / "sentences", shards=1, sentences=4)
    monkeypatch.chdir(tmp_path)
    config = str(Path(__file__).parents[1] / "configs" / "lvm_tiny.yaml")
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", "-c", config, "--data.train_shards", str(shards), "--data.val_shards", str(shards), *args])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {message}"
