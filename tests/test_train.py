"""Generator training (`bitdance.train.run`): loss goes down, run folder, exact resume, overfitting, options."""

import json
import signal

import pytest
import torch

import bitdance.train as tr
from bitdance.data import SyntheticImages
from bitdance.models.autoencoder import ImageTokenizer, TokenizerConfig
from bitdance.models.transformer import BITDANCE_PRESETS, BitDance
from bitdance.pipeline import BitDancePipeline
from bitdance.train import TrainConfig, run
from bitdance.utils import UserError, ema_decay_at, load_checkpoint


def write_images(root, num_images, num_classes, flat=False, seed=0):
    """Synthetic 16x16 RGB shapes as PNGs, in class subfolders (or flat)."""
    from PIL import Image

    ds = SyntheticImages(num_images, 16, 3, num_classes=num_classes, seed=seed)
    for i in range(num_images):
        d = root if flat else root / ds.class_names[int(ds.labels[i])]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(ds.images[i].permute(1, 2, 0).numpy()).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A random-init tokenizer: 16x16 RGB -> 4x4 tokens of 8 bits (the `tiny` generator's grid)."""
    torch.manual_seed(0)
    tok = ImageTokenizer(TokenizerConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=8, resolution=16))
    return tok.save_pretrained(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("shapes"), 8, 4)


def cfg(tokenizer_dir, data_dir, out, **kw):
    base = dict(tokenizer=str(tokenizer_dir), data=str(data_dir), out=str(out), preset="tiny", steps=6,
                batch_size=8, lr=3e-3, warmup=2, log_every=1, save_every=100, sample_every=0, progress=False)
    return TrainConfig(**{**base, **kw})


def rows(out):
    return [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]


def test_training_lowers_the_loss_and_writes_the_run_folder(tokenizer_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    model_dir = run(cfg(tokenizer_dir, data_dir, out, steps=40, log_every=10, save_every=20, sample_every=None,
                        samples_per_class=2))
    losses = [r["loss"] for r in rows(out)]
    assert [r["step"] for r in rows(out)] == [10, 20, 30, 40]
    assert losses[-1] < 0.75 * losses[0], losses
    for name in ("config.json", "checkpoint.pt", "loss_curve.png", "samples.png", "log.txt", "tokens.safetensors",
                 "samples/step_0000020.png", "samples/step_0000040.png"):
        assert (out / name).is_file(), name
    state = load_checkpoint(out / "checkpoint.pt")  # weights_only: plain types only
    assert state["step"] == 40 and state["class_names"] == ["circle", "diamond", "ring", "square"]
    assert set(state) >= {"model", "ema", "optimizer", "config", "model_config"}

    assert model_dir == out / "model"
    pipe = BitDancePipeline.from_pretrained(model_dir)
    assert pipe.class_names == ["circle", "diamond", "ring", "square"]
    c = pipe.model.config
    assert (c.num_classes, tuple(c.grid_size), c.token_bits) == (4, (4, 4), 8)  # from the data and tokenizer
    exported = pipe.model.state_dict()
    assert all(torch.equal(v, state["ema"][k]) for k, v in exported.items())  # the EMA is exported ...
    assert not all(torch.equal(v, state["model"][k]) for k, v in exported.items())  # ... not the raw weights
    from PIL import Image

    grid = Image.open(out / "samples.png")  # one row per class: 4 rows of 16 px tiles upscaled 4x
    assert grid.height == (4 * (16 + 2) + 2) * 4


def test_resume_continues_from_the_saved_step_and_matches(tokenizer_dir, data_dir, tmp_path):
    straight = tmp_path / "straight"
    run(cfg(tokenizer_dir, data_dir, straight))
    parts = tmp_path / "parts"
    assert run(cfg(tokenizer_dir, data_dir, parts, stop_after=3)) == parts / "checkpoint.pt"
    assert load_checkpoint(parts / "checkpoint.pt")["step"] == 3 and not (parts / "model").exists()
    run(cfg(tokenizer_dir, data_dir, parts))  # picks up parts/checkpoint.pt by itself
    assert "resumed from" in (parts / "log.txt").read_text()

    a, b = load_checkpoint(straight / "checkpoint.pt"), load_checkpoint(parts / "checkpoint.pt")
    assert a["step"] == b["step"] == 6
    for key in ("model", "ema"):
        for k, v in a[key].items():
            assert torch.equal(v, b[key][k]), (key, k)
    assert [(r["step"], r["loss"]) for r in rows(straight)] == [(r["step"], r["loss"]) for r in rows(parts)]


def test_tiny_model_overfits_one_image_per_class(tokenizer_dir, tmp_path):
    """4 classes, one image each: samples must decode closest to their own class's training image."""
    data = write_images(tmp_path / "data", 4, 4)
    out = tmp_path / "run"
    model_dir = run(cfg(tokenizer_dir, data, out, parallel=4, steps=200, lr=5e-3, warmup=10, log_every=50))
    pipe = BitDancePipeline.from_pretrained(model_dir)
    labels = [0, 1, 2, 3] * 4
    images = pipe(labels, generator=torch.Generator().manual_seed(0), output_type="pt", progress=False).images

    from safetensors.torch import load_file

    cache = load_file(out / "tokens.safetensors")
    with torch.no_grad():
        train = pipe.tokenizer.decode(cache["codes"].float()).clamp(-1, 1)  # (4, 3, 16, 16), one per class
    dist = ((images[:, None] - train[None]) ** 2).flatten(2).mean(-1)  # (16, 4)
    nearest = cache["labels"][dist.argmin(1)]
    accuracy = (nearest == torch.tensor(labels)).float().mean().item()
    assert accuracy >= 0.9, (accuracy, nearest.tolist())


def test_flat_folder_trains_an_unconditional_model(tokenizer_dir, tmp_path):
    data = write_images(tmp_path / "flat", 4, 2, flat=True)
    pipe = BitDancePipeline.from_pretrained(run(cfg(tokenizer_dir, data, tmp_path / "run", steps=2)))
    c = pipe.model.config
    assert (c.num_classes, c.class_dropout, c.cfg_scale) == (1, 0.0, 1.0)
    assert pipe.class_names == ["image"]
    # guidance or label dropout asked for on one class: said plainly, before any encoding
    for bad in (dict(cfg_scale=2.0), dict(class_dropout=0.1)):
        with pytest.raises(UserError, match="one class"):
            run(cfg(tokenizer_dir, data, tmp_path / "bad", steps=2, **bad))
        assert not (tmp_path / "bad" / "tokens.safetensors").exists()


def test_hflip_encodes_a_mirrored_second_version(tokenizer_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    run(cfg(tokenizer_dir, data_dir, out, steps=1, hflip=True, sampling_steps=3, cfg_scale=1.5))
    from safetensors.torch import load_file

    plain, flipped = load_file(out / "tokens.safetensors"), load_file(out / "tokens_hflip.safetensors")
    assert plain["codes"].dtype == torch.int8 and plain["codes"].shape == flipped["codes"].shape == (8, 8, 4, 4)
    assert not torch.equal(plain["codes"], flipped["codes"])
    c = BitDancePipeline.from_pretrained(out / "model").model.config
    assert (c.num_sampling_steps, c.cfg_scale) == (3, 1.5)  # sampling defaults saved with the model


def test_weight_decay_groups_follow_the_official_split():
    model = BitDance(BITDANCE_PRESETS["tiny"](parallel=4))
    decay, no_decay = tr.param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert {"cls_embedding.weight", "query_token", "proj_in.w1.weight", "proj_in.w2.bias", "norm.weight"} <= nd
    assert {"layers.0.attention.wqkv.weight", "pos_for_diff.weight", "head.net.res_blocks.0.w1.weight"} <= d
    assert all(model.get_parameter(n).ndim >= 2 for n in d)
    assert len(d) + len(nd) == len(names)


def test_ema_decay_is_warmed_up():
    assert ema_decay_at(0.999, 0) == pytest.approx(0.1)
    assert ema_decay_at(0.999, 100) == pytest.approx(101 / 110)
    assert ema_decay_at(0.999, 10**6) == 0.999


def test_nan_gradient_under_a_finite_loss_stops_before_the_update(tokenizer_dir, data_dir, tmp_path, monkeypatch):
    forward, calls = BitDance.forward, []

    def nan_gradient_from_step_4(self, tokens, labels, generator=None):
        calls.append(1)
        loss = forward(self, tokens, labels, generator=generator)
        if len(calls) < 4:
            return loss
        w = self.proj_in.w1.weight
        return loss + 0.0 * (w - w.detach()).abs().sum().sqrt()  # adds 0; d sqrt(u)/du at 0 is inf -> NaN grads

    monkeypatch.setattr(BitDance, "forward", nan_gradient_from_step_4)
    with pytest.raises(FloatingPointError, match="gradient norm is nan at step 4"):
        run(cfg(tokenizer_dir, data_dir, tmp_path / "run", save_every=2))
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_ctrl_c_inside_a_step_saves_that_step_whole_and_resumes_exactly(tokenizer_dir, data_dir, tmp_path,
                                                                         monkeypatch):
    straight = tmp_path / "straight"
    run(cfg(tokenizer_dir, data_dir, straight))
    calls, update_ema = [], tr.update_ema

    def ctrl_c_in_step_3(ema, model, decay):  # Ctrl-C lands after the weights' update, before the EMA's
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)
        update_ema(ema, model, decay)

    split = tmp_path / "split"
    with monkeypatch.context() as m:
        m.setattr(tr, "update_ema", ctrl_c_in_step_3)
        with pytest.raises(KeyboardInterrupt):
            run(cfg(tokenizer_dir, data_dir, split))
    assert load_checkpoint(split / "checkpoint.pt")["step"] == 3
    assert "interrupted: checkpoint saved at step 3" in (split / "log.txt").read_text()
    run(cfg(tokenizer_dir, data_dir, split))
    a, b = load_checkpoint(straight / "checkpoint.pt"), load_checkpoint(split / "checkpoint.pt")
    for key in ("model", "ema"):
        for k, v in a[key].items():
            assert torch.equal(v, b[key][k]), (key, k)


def test_unreadable_training_images_are_named_in_the_run_log(tokenizer_dir, tmp_path):
    data = write_images(tmp_path / "data", 8, 4)
    (data / "circle" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    run(cfg(tokenizer_dir, data, tmp_path / "run", steps=1))
    assert "corrupt.png" in (tmp_path / "run" / "log.txt").read_text()


def test_nan_loss_stops_the_run(tokenizer_dir, data_dir, tmp_path, monkeypatch):
    def nan_forward(self, tokens, labels, generator=None):
        return self.proj_in.w1.weight.sum() * float("nan")

    monkeypatch.setattr(BitDance, "forward", nan_forward)
    with pytest.raises(FloatingPointError, match="step 1"):
        run(cfg(tokenizer_dir, data_dir, tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_user_errors(tokenizer_dir, data_dir, tmp_path):
    with pytest.raises(UserError, match="tokenizer folder not found"):
        run(cfg(tmp_path / "nope", data_dir, tmp_path / "a"))
    with pytest.raises(UserError, match="data path not found"):
        run(cfg(tokenizer_dir, tmp_path / "nope", tmp_path / "b"))
    with pytest.raises(UserError, match="steps"):
        run(cfg(tokenizer_dir, data_dir, tmp_path / "c", steps=0))
    with pytest.raises(UserError, match="preset"):
        run(cfg(tokenizer_dir, data_dir, tmp_path / "d", preset="XXL"))
    with pytest.raises(UserError, match="not divisible"):  # 4x4 grid, 8x8 patches
        run(cfg(tokenizer_dir, data_dir, tmp_path / "e", parallel=64))
    out = tmp_path / "f"
    run(cfg(tokenizer_dir, data_dir, out, steps=4, stop_after=1))
    with pytest.raises(UserError, match="--stop-after must be at least 1"):
        run(cfg(tokenizer_dir, data_dir, out, steps=4, stop_after=0))
    with pytest.raises(UserError, match="another model config"):  # resuming with another --parallel
        run(cfg(tokenizer_dir, data_dir, out, steps=4, parallel=4))


def test_model_args_override_the_preset_and_are_kept_on_resume(tokenizer_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    args = {"dim": 48, "diff_batch_mul": 3, "cfg_schedule": "constant"}
    model = BitDance.from_pretrained(run(cfg(tokenizer_dir, data_dir, out, steps=1, model_args=args)) / "generator")
    c = model.config
    assert (c.dim, c.diff_batch_mul, c.cfg_schedule, c.n_layers) == (48, 3, "constant", 2)  # n_layers: the preset's
    assert model.norm.weight.shape == (48,)
    with pytest.raises(UserError, match="another model config"):  # a resume with another width
        run(cfg(tokenizer_dir, data_dir, out, steps=2, model_args={**args, "dim": 64}))
    with pytest.raises(UserError, match="unknown BitDance config field"):
        run(cfg(tokenizer_dir, data_dir, tmp_path / "a", model_args={"width": 48}))
    with pytest.raises(UserError, match="token_bits"):  # fixed by the tokenizer
        run(cfg(tokenizer_dir, data_dir, tmp_path / "b", model_args={"token_bits": 16}))
    with pytest.raises(UserError, match="given twice"):
        run(cfg(tokenizer_dir, data_dir, tmp_path / "c", class_dropout=0.2, model_args={"class_dropout": 0.3}))


def test_no_class_dropout_means_no_guidance(tokenizer_dir, tmp_path):
    """Without class dropout the null class is never trained: the model's default guidance becomes 1, and asking
    for more is refused before any training."""
    tok = ImageTokenizer.from_pretrained(tokenizer_dir)
    base = dict(tokenizer=str(tokenizer_dir), data="unused", preset="tiny", class_dropout=0.0)
    assert tr.build_model_config(TrainConfig(**base), tok, num_classes=3).cfg_scale == 1.0
    with_dropout = TrainConfig(**{**base, "class_dropout": 0.1})
    assert tr.build_model_config(with_dropout, tok, num_classes=3).cfg_scale == 2.0  # the tiny preset's
    for explicit in (dict(cfg_scale=2.0), dict(model_args={"cfg_scale": 2.0})):
        with pytest.raises(UserError, match="class dropout"):
            tr.build_model_config(TrainConfig(**base, **explicit), tok, num_classes=3)


def test_rerunning_a_finished_run_with_new_sampling_defaults_re_exports_it(tokenizer_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    first = BitDance.from_pretrained(run(cfg(tokenizer_dir, data_dir, out, steps=2, cfg_scale=3.0)) / "generator")
    again = BitDance.from_pretrained(run(cfg(tokenizer_dir, data_dir, out, steps=2, cfg_scale=1.5, sampling_steps=7,
                                             model_args={"head_temperature": 0.9})) / "generator")
    assert (first.config.cfg_scale, again.config.cfg_scale, again.config.num_sampling_steps) == (3.0, 1.5, 7)
    assert again.config.head_temperature == 0.9 and again.head.config.temperature == 0.9
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 2  # nothing trained again
    sa, sb = first.state_dict(), again.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_extending_a_finished_run_with_schedule_start_warms_up_afresh(tokenizer_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    run(cfg(tokenizer_dir, data_dir, out, steps=4, lr=1e-3, min_lr=1e-5))
    assert rows(out)[-1]["lr"] < 0.6e-3  # the first cosine has decayed
    run(cfg(tokenizer_dir, data_dir, out, steps=8, lr=2e-4, min_lr=1e-5, warmup=2, schedule_start=4))
    lrs = {r["step"]: r["lr"] for r in rows(out)}  # the lr a step used, logged after it
    assert lrs[5] == pytest.approx(1e-4) and lrs[6] == pytest.approx(2e-4)  # fresh warmup to the new peak
    assert lrs[7] == pytest.approx(2e-4) and lrs[8] < lrs[7]  # then a fresh cosine
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 8
    log = (out / "log.txt").read_text()
    assert "planned for 4 steps and now for 8" in log and "re-stretches" not in log

    run(cfg(tokenizer_dir, data_dir, out, steps=10, lr=2e-4, min_lr=1e-5, warmup=2, schedule_start=4, stop_after=1))
    run(cfg(tokenizer_dir, data_dir, out, steps=10, lr=1e-4, min_lr=1e-5, warmup=2, schedule_start=4))
    assert "the schedule changed (--lr 0.0002 -> 0.0001): at step 9" in (out / "log.txt").read_text()

    plain = tmp_path / "plain"  # without --schedule-start the whole cosine is re-stretched: said, not silent
    run(cfg(tokenizer_dir, data_dir, plain, steps=4))
    run(cfg(tokenizer_dir, data_dir, plain, steps=8))
    assert "--schedule-start 4" in (plain / "log.txt").read_text()
    with pytest.raises(UserError, match="schedule-start"):
        run(cfg(tokenizer_dir, data_dir, tmp_path / "bad", steps=4, schedule_start=4))


def test_a_resume_takes_this_runs_optimizer_flags_and_refuses_impossible_plans(tokenizer_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    run(cfg(tokenizer_dir, data_dir, out, steps=4))
    run(cfg(tokenizer_dir, data_dir, out, steps=6, weight_decay=0.2, beta2=0.99))
    groups = load_checkpoint(out / "checkpoint.pt")["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.2, 0.0]  # not the saved 0.05
    assert all(tuple(g["betas"]) == (0.9, 0.99) for g in groups)
    with pytest.raises(UserError, match="past --steps 5"):
        run(cfg(tokenizer_dir, data_dir, out, steps=5))
    with pytest.raises(UserError, match=r"after the step this run starts from \(6\)"):
        run(cfg(tokenizer_dir, data_dir, out, steps=10, schedule_start=8))
    with pytest.raises(UserError, match=r"starts from \(0\)"):  # a fresh run has no schedule before step 0
        run(cfg(tokenizer_dir, data_dir, tmp_path / "fresh", steps=10, schedule_start=2))
    for bad, message in ((dict(lr=0.0), "--lr must be > 0"), (dict(min_lr=-1e-5), "--min-lr"),
                         (dict(weight_decay=-0.1), "--weight-decay"), (dict(samples_per_class=0), "samples-per-class"),
                         (dict(model_args={"cfg_scale": "abc"}), "do not build a model"),
                         (dict(model_args={"dim": 48.0}), "whole numbers")):
        with pytest.raises(UserError, match=message):
            run(cfg(tokenizer_dir, data_dir, tmp_path / "bad", **bad))


def test_schedule_lr_starts_at_schedule_start():
    c = TrainConfig(steps=110, lr=1.0, min_lr=0.0, warmup=10, schedule_start=10)
    assert tr.schedule_lr(c, 10) == pytest.approx(0.1) and tr.schedule_lr(c, 19) == pytest.approx(1.0)
    assert tr.schedule_lr(c, 110) == pytest.approx(0.0, abs=1e-12)
