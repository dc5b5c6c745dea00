import dataclasses
import json
import re
import shutil
import signal

import pytest
import torch

import bitdance.train_tokenizer as tt
from bitdance.data import SyntheticImages
from bitdance.models.autoencoder import TOKENIZER_PRESETS, ImageTokenizer
from bitdance.train_tokenizer import TokenizerTrainConfig, run
from bitdance.utils import UserError, load_checkpoint


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """16 synthetic 16x16 RGB images in 4 class folders (the `tiny` preset's input)."""
    from PIL import Image

    from bitdance.utils import to_uint8

    root = tmp_path_factory.mktemp("shapes")
    ds = SyntheticImages(16, 16, 3, num_classes=4, seed=0)
    arr = to_uint8(ds.get_batch(range(16))[0]).numpy()
    for i in range(16):
        d = root / ds.class_names[int(ds.labels[i])]
        d.mkdir(exist_ok=True)
        Image.fromarray(arr[i]).save(d / f"{i}.png")
    return root


def _cfg(data_dir, out, **kw):
    base = dict(data=str(data_dir), out=str(out), preset="tiny", steps=6, batch_size=8, lr=2e-3, warmup=2,
                log_every=2, sample_every=0, save_every=100, eval_images=0, progress=False)
    return TokenizerTrainConfig(**{**base, **kw})


def _rows(out):
    return [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]


def test_training_lowers_the_loss_and_exports(data_dir, tmp_path):
    out = tmp_path / "run"
    model_dir = run(_cfg(data_dir, out, steps=24, log_every=6, eval_images=8, sample_every=24))
    rows = [r for r in _rows(out) if "l1" in r]
    assert [r["step"] for r in rows] == [6, 12, 18, 24]
    assert rows[-1]["l1"] < 0.75 * rows[0]["l1"], rows
    assert rows[-1]["loss"] < rows[0]["loss"]
    evals = [r for r in _rows(out) if "eval_psnr" in r]
    assert len(evals) == 1 and evals[0]["eval_images"] == 8 and evals[0]["eval_psnr"] > 5
    for name in ("config.json", "checkpoint.pt", "loss_curve.png", "reconstructions.png", "log.txt"):
        assert (out / name).is_file(), name
    run_cfg = json.loads((out / "config.json").read_text())
    assert run_cfg["data"]["class_names"] == ["circle", "diamond", "ring", "square"]
    assert run_cfg["tokenizer"]["z_channels"] == 16
    tok = ImageTokenizer.from_pretrained(model_dir)
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["step"] == 24
    assert all(torch.equal(v, state["ema"][k]) for k, v in tok.state_dict().items())  # the EMA is exported
    assert not all(torch.equal(v, state["model"][k]) for k, v in tok.state_dict().items())


def _run_with_ctrl_c_in_step(cfg, step, monkeypatch):
    """Run `cfg` with a Ctrl-C landing inside step `step`, after the weights' update and before the EMA's."""
    calls, update_ema = [], tt.update_ema

    def update_then_ctrl_c(ema, model, decay):
        calls.append(1)
        if len(calls) == step:
            signal.raise_signal(signal.SIGINT)
        update_ema(ema, model, decay)

    with monkeypatch.context() as m:
        m.setattr(tt, "update_ema", update_then_ctrl_c)
        with pytest.raises(KeyboardInterrupt):
            run(cfg)


def test_gan_decoder_noise_is_seeded_per_step_so_resume_is_exact(data_dir, tmp_path, monkeypatch):
    gan = dataclasses.replace(TOKENIZER_PRESETS["tiny"](), gan_decoder=True)
    ImageTokenizer(gan).save_pretrained(tmp_path / "init")
    straight, split = tmp_path / "straight", tmp_path / "split"
    torch.manual_seed(1)  # the global RNG must not matter
    run(_cfg(data_dir, straight, steps=4, init_from=str(tmp_path / "init")))
    torch.manual_seed(2)
    _run_with_ctrl_c_in_step(_cfg(data_dir, split, steps=4, init_from=str(tmp_path / "init")), 2, monkeypatch)
    run(_cfg(data_dir, split, steps=4, init_from=str(tmp_path / "init")))
    a, b = load_checkpoint(straight / "checkpoint.pt"), load_checkpoint(split / "checkpoint.pt")
    for k, v in a["model"].items():
        assert torch.allclose(v, b["model"][k], atol=1e-6), k


def test_resume_continues_from_the_saved_step_and_matches_one_run(data_dir, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    run(_cfg(data_dir, straight, steps=6))

    split = tmp_path / "split"
    _run_with_ctrl_c_in_step(_cfg(data_dir, split, steps=6), 4, monkeypatch)
    assert load_checkpoint(split / "checkpoint.pt")["step"] == 4  # step 4 was finished, then saved
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the trainer's handler is gone
    run(_cfg(data_dir, split, steps=6))  # auto-resume from split/checkpoint.pt
    assert [r["step"] for r in _rows(split)] == [2, 4, 6]
    a, b = load_checkpoint(straight / "checkpoint.pt"), load_checkpoint(split / "checkpoint.pt")
    assert b["step"] == 6
    for key in ("model", "ema"):  # same data order, lr schedule, optimizer and EMA state
        for k, v in a[key].items():
            assert torch.allclose(v, b[key][k], atol=1e-5), (key, k)

    with pytest.raises(UserError, match="another tokenizer config"):
        run(_cfg(data_dir, split, steps=8, quantizer="vq"))
    with pytest.raises(UserError, match="no checkpoint"):
        run(_cfg(data_dir, tmp_path / "new", resume=str(tmp_path / "missing")))


def test_gan_run_resumes_exactly_with_its_discriminator(data_dir, tmp_path, monkeypatch):
    gan = dict(steps=4, disc_weight=0.1, disc_start=1)
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(_cfg(data_dir, straight, **gan))
    _run_with_ctrl_c_in_step(_cfg(data_dir, split, **gan), 2, monkeypatch)
    run(_cfg(data_dir, split, **gan))
    a, b = load_checkpoint(straight / "checkpoint.pt"), load_checkpoint(split / "checkpoint.pt")
    for key in ("model", "disc", "lecam"):  # the discriminator and the LeCAM EMAs came back too
        for k, v in a[key].items():
            assert torch.allclose(v.float(), b[key][k].float(), atol=1e-6), (key, k)
    # going on without --disc-weight would drop the discriminator from the next checkpoint: refused
    with pytest.raises(UserError, match="trained with a discriminator"):
        run(_cfg(data_dir, split, steps=6))
    assert "disc" in load_checkpoint(split / "checkpoint.pt")


def test_vq_and_gan_paths_run(data_dir, tmp_path):
    out = tmp_path / "vq"
    run(_cfg(data_dir, out, steps=2, quantizer="vq", disc_weight=0.1, disc_start=1, log_every=1))
    rows = _rows(out)
    assert "g_loss" not in rows[0] and rows[1]["g_loss"] > 0 and rows[1]["d_loss"] > 0
    assert rows[0]["codebook"] > 0 and rows[0]["entropy"] == 0.0
    state = load_checkpoint(out / "checkpoint.pt")
    assert {"disc", "disc_optimizer", "lecam"} <= set(state)
    assert ImageTokenizer.from_pretrained(out / "model").config.quantizer == "vq"


def test_disc_warmup_trains_the_discriminator_before_the_decoder_feels_it(data_dir, tmp_path):
    out = tmp_path / "warm"
    run(_cfg(data_dir, out, steps=4, disc_weight=0.1, disc_start=1, disc_warmup=2, log_every=1))
    rows = _rows(out)
    assert ["d_loss" in r for r in rows] == [False, True, True, True]  # the discriminator learns from step 1
    assert ["g_loss" in r for r in rows] == [False, False, False, True]  # the decoder feels it from step 3


def test_nan_loss_stops_the_run(data_dir, tmp_path):
    with pytest.raises(FloatingPointError, match="step 1"):
        run(_cfg(data_dir, tmp_path / "nan", entropy_weight=float("nan")))
    assert not (tmp_path / "nan" / "checkpoint.pt").exists()


def test_time_budget_stops_early_and_still_exports(data_dir, tmp_path):
    out = tmp_path / "budget"
    run(_cfg(data_dir, out, steps=500, max_minutes=1e-4))  # 6 ms: the first step already exceeds it
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["step"] == 1 and state["train_seconds"] > 0.006
    assert (out / "model" / "model.safetensors").is_file()
    assert "time budget" in (out / "log.txt").read_text()
    assert _rows(out)[-1]["step"] == 1 and _rows(out)[-1]["train_minutes"] > 0  # the cut-short interval is logged


def test_decoder_only_fine_tune_keeps_the_codes_bit_identical(data_dir, tmp_path):
    """A decoder fine-tune (here with the GAN) must not move a single code: generators trained on the first
    tokenizer keep working. It starts from the given weights, and only the decoder changes."""
    first = run(_cfg(data_dir, tmp_path / "first", steps=4))
    tuned = run(_cfg(data_dir, tmp_path / "tuned", init_from=str(tmp_path / "first"), decoder_only=True, steps=6,
                     disc_weight=0.5, lr=1e-2, preset="fmnist"))  # the preset is ignored: the config comes along
    a, b = ImageTokenizer.from_pretrained(first), ImageTokenizer.from_pretrained(tuned)
    assert a.config == b.config
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if not k.startswith("decoder."))
    assert all(not torch.equal(sa[k], sb[k]) for k in sa if k.startswith("decoder.") and k.endswith(".weight"))
    images = SyntheticImages(16, 16, 3, num_classes=4, seed=1).get_batch(range(8))[0]
    assert torch.equal(a.encode(images), b.encode(images))
    codes = a.encode(images)
    assert not torch.allclose(a.decode(codes), b.decode(codes))
    # a full fine-tune from the same weights moves the encoder: the test above is not vacuous
    full = ImageTokenizer.from_pretrained(run(_cfg(data_dir, tmp_path / "full", init_from=str(first), steps=6,
                                                   lr=1e-2)))
    assert not torch.equal(full.state_dict()["encoder.conv_in.weight"], sa["encoder.conv_in.weight"])


def test_a_plain_decoder_widened_to_the_noise_decoder_starts_where_it_was(data_dir, tmp_path):
    """--gan-decoder with --init-from a plain decoder: the new noise inputs start at zero weight, so the widened
    decoder draws the same images; a decoder-only fine-tune then learns to use the noise, codes untouched."""
    first = ImageTokenizer.from_pretrained(run(_cfg(data_dir, tmp_path / "first", steps=2))).eval()
    wide = first.with_noise_decoder().eval()
    images = SyntheticImages(16, 16, 3, num_classes=4, seed=1).get_batch(range(8))[0]
    codes = first.encode(images)
    assert wide.config.gan_decoder and torch.equal(wide.encode(images), codes)
    assert torch.equal(wide.decode(codes, generator=torch.Generator().manual_seed(0)), first.decode(codes))
    with pytest.raises(UserError, match="already takes noise"):
        wide.with_noise_decoder()
    tuned = ImageTokenizer.from_pretrained(run(_cfg(data_dir, tmp_path / "tuned", init_from=str(tmp_path / "first"),
                                                    decoder_only=True, gan_decoder=True, steps=4, lr=1e-2))).eval()
    assert tuned.config.gan_decoder and torch.equal(tuned.encode(images), codes)
    noise_weights = tuned.decoder.conv_in.weight[:, first.config.z_channels:]
    assert noise_weights.abs().max() > 0  # trained: the decoder now listens to its noise
    a = tuned.decode(codes, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(a, tuned.decode(codes, generator=torch.Generator().manual_seed(1)))


def test_init_from_and_decoder_only_refuse_bad_combinations(data_dir, tmp_path):
    with pytest.raises(UserError, match="--init-from"):
        run(_cfg(data_dir, tmp_path / "a", decoder_only=True))
    with pytest.raises(UserError, match="no tokenizer found"):
        run(_cfg(data_dir, tmp_path / "b", init_from=str(tmp_path)))
    first = run(_cfg(data_dir, tmp_path / "first", steps=2))
    with pytest.raises(UserError, match="--quantizer"):
        run(_cfg(data_dir, tmp_path / "c", init_from=str(first), quantizer="vq"))


@pytest.mark.parametrize("bad", [dict(save_every=0), dict(log_every=0), dict(batch_size=0), dict(eval_every=-1),
                                 dict(ema_decay=1.0)])
def test_bad_loop_options_are_refused_before_training(data_dir, tmp_path, bad):
    """Each of these used to divide by zero (or never stop) somewhere inside the loop."""
    with pytest.raises(UserError, match="must be"):
        run(_cfg(data_dir, tmp_path / "run", **bad))
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_bad_eval_split_fails_before_training(data_dir, tmp_path, monkeypatch):
    """The eval set is opened at startup: a mistyped split must not cost a whole run (and its export)."""
    split_data = tmp_path / "data"
    shutil.copytree(data_dir, split_data / "train")  # a train/ folder and no test/ or val/
    monkeypatch.setattr(tt, "update_ema", lambda *a: pytest.fail("a training step ran"))
    with pytest.raises(UserError, match="no 'test' split"):
        run(_cfg(data_dir=split_data, out=tmp_path / "run", eval_images=4))
    with pytest.raises(UserError, match="no 'tset' split"):
        run(_cfg(data_dir=split_data, out=tmp_path / "run", eval_images=4, eval_split="tset"))


def test_eval_images_0_skips_every_evaluation(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(tt, "evaluate_tokenizer", lambda *a, **k: pytest.fail("evaluated with --eval-images 0"))
    out = tmp_path / "run"
    run(_cfg(data_dir, out, steps=2, eval_images=0))
    assert not [r for r in _rows(out) if "eval_psnr" in r] and (out / "model" / "model.safetensors").is_file()


def test_the_model_is_exported_before_the_final_evaluation(data_dir, tmp_path, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(tt, "evaluate_tokenizer", broken)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="evaluation failed"):
        run(_cfg(data_dir, out, steps=2, eval_images=4))
    assert (out / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize("bad,message", [
    (dict(lr=0.0, disc_weight=0.1), "--lr must be > 0"),  # used to divide by zero in the discriminator's lr
    (dict(lr=-1e-3), "--lr must be > 0"),
    (dict(eval_images=-1), "--eval-images must be at least 0"),
    (dict(lpips_weights="vgg.pth"), "--lpips-weights has no effect with --lpips-weight 0"),
    (dict(disc_start=5, gen_loss="hinge"), "--disc-start, --gen-loss have no effect with --disc-weight 0"),
    (dict(lecam_weight=0.1), "--lecam-weight has no effect with --disc-weight 0"),
    (dict(eval_every=2), "--eval-every has no effect with --eval-images 0"),
])
def test_bad_or_ignored_options_are_refused_before_training(data_dir, tmp_path, bad, message):
    with pytest.raises(UserError, match=re.escape(message)):
        run(_cfg(data_dir, tmp_path / "run", **bad))
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_the_final_reconstruction_grid_is_rendered_once(data_dir, tmp_path, monkeypatch):
    calls, save_grid = [], tt.save_image_grid

    def counting(images, path, **kw):
        calls.append(path.name)
        return save_grid(images, path, **kw)

    monkeypatch.setattr(tt, "save_image_grid", counting)
    out = tmp_path / "run"
    run(_cfg(data_dir, out, steps=4, sample_every=2))
    assert calls == ["recon_0000002.png", "recon_0000004.png"]
    assert (out / "reconstructions.png").read_bytes() == (out / "samples" / "recon_0000004.png").read_bytes()
