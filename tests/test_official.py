"""Official checkpoint conversion, official sampling presets and class-balanced (DDP) sampling to ADM .npz.

The fake official files are written from ref §6.2 (names and shapes spelled out below, independently of our
module tree) for tiny configs: d 128 (2 heads of 64), 2 layers, 4 class tokens, 10 classes, 4x4 grid of 32 bits,
head width 128; tokenizer ch 32, ch_mult (1, 2) (2x down, so 8x8 images).
"""

import argparse
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from bitdance import cli
from bitdance.flow import RectifiedFlow
from bitdance.models.autoencoder import ImageTokenizer
from bitdance.official import OFFICIAL_MODELS, infer_official_config
from bitdance.pipeline import BitDancePipeline
from bitdance.sampling import generate
from bitdance.utils import UserError, count_parameters, read_json, save_image_grid

D, LAYERS, C, CLASSES, K, GRID = 128, 2, 4, 10, 32, 4


def backbone_shapes(dim, layers, classes, C, k, n, P):
    ffh = ((8 * dim // 3) + 255) // 256 * 256
    hid = 3 * dim // 2
    s = {"cls_embedding.weight": (classes + 1, C * dim), "proj_in.w1.weight": (2 * hid, k),
         "proj_in.w1.bias": (2 * hid,), "proj_in.w2.weight": (dim, hid), "proj_in.w2.bias": (dim,),
         "emb_norm.weight": (dim,), "norm.weight": (dim,), "pos_for_diff.weight": (n, dim)}
    if P > 1:
        s["query_token"] = (1, P - 1, dim)
    for i in range(layers):
        s |= {f"layers.{i}.attention.wqkv.weight": (3 * dim, dim), f"layers.{i}.attention.wo.weight": (dim, dim),
              f"layers.{i}.feed_forward.w1.weight": (2 * ffh, dim), f"layers.{i}.feed_forward.w2.weight": (dim, ffh),
              f"layers.{i}.attention_norm.weight": (dim,), f"layers.{i}.ffn_norm.weight": (dim,)}
    return s


def head_shapes(D, depth, n_adaln, d, k, P):
    h, n = 3 * D // 2, "head.net."
    s = {n + "time_embed.mlp.0.weight": (D, 256), n + "time_embed.mlp.0.bias": (D,),
         n + "time_embed.mlp.2.weight": (D, D), n + "time_embed.mlp.2.bias": (D,),
         n + "cond_embed.weight": (D, d), n + "cond_embed.bias": (D,),
         n + "input_proj.weight": (D, k), n + "input_proj.bias": (D,),
         n + "final_layer.ada_ln_modulation.weight": (2 * D, D), n + "final_layer.ada_ln_modulation.bias": (2 * D,),
         n + "final_layer.linear.weight": (k, D), n + "final_layer.linear.bias": (k,)}
    m = 3 if P == 1 else 6
    for a in range(n_adaln):
        s |= {f"{n}ada_ln_blocks.{a}.weight": (m * D, D), f"{n}ada_ln_blocks.{a}.bias": (m * D,)}
    for j in range(depth):
        r = f"{n}res_blocks.{j}."
        s |= {r + "w1.weight": (2 * h, D), r + "w1.bias": (2 * h,), r + "w2.weight": (D, h), r + "w2.bias": (D,)}
        names = ["norm"] if P == 1 else ["norm1", "norm2"]
        s |= {r + f"{x}.{y}": (D,) for x in names for y in ("weight", "bias")}
        if P > 1:
            s |= {r + "attn.wqkv.weight": (3 * D, D), r + "attn.wqkv.bias": (3 * D,), r + "attn.wo.weight": (D, D),
                  r + "attn.wo.bias": (D,)}
    return s


def vae_shapes(z=K):
    """Official VQModel keys for ch 32, ch_mult (1, 2), one res block per level (ref §2.2, §6.2)."""
    s = {}

    def res(p, ci, co):
        s.update({f"{p}.norm1.weight": (ci,), f"{p}.norm1.bias": (ci,), f"{p}.conv1.weight": (co, ci, 3, 3),
                  f"{p}.norm2.weight": (co,), f"{p}.norm2.bias": (co,), f"{p}.conv2.weight": (co, co, 3, 3)})
        if ci != co:
            s[f"{p}.nin_shortcut.weight"] = (co, ci, 1, 1)

    s["encoder.conv_in.weight"] = (32, 3, 3, 3)
    res("encoder.down.0.block.0", 32, 32)
    s |= {"encoder.down.0.downsample.weight": (32, 32, 3, 3), "encoder.down.0.downsample.bias": (32,)}
    res("encoder.down.1.block.0", 32, 64)
    res("encoder.mid_block.0", 64, 64)
    s |= {"encoder.norm_out.weight": (64,), "encoder.norm_out.bias": (64,), "encoder.conv_out.weight": (z, 64, 1, 1),
          "encoder.conv_out.bias": (z,), "decoder.conv_in.weight": (64, z, 3, 3), "decoder.conv_in.bias": (64,)}
    res("decoder.mid_block.0", 64, 64)
    for lvl, ci, co in ((1, 64, 64), (0, 64, 32)):
        for g in ("gamma", "beta"):
            s |= {f"decoder.adaptive.{lvl}.{g}.weight": (ci, z), f"decoder.adaptive.{lvl}.{g}.bias": (ci,)}
        res(f"decoder.up.{lvl}.block.0", ci, co)
    s |= {"decoder.up.1.upsample.conv1.weight": (256, 64, 3, 3), "decoder.up.1.upsample.conv1.bias": (256,),
          "decoder.norm_out.weight": (32,), "decoder.norm_out.bias": (32,), "decoder.conv_out.weight": (3, 32, 3, 3),
          "decoder.conv_out.bias": (3,)}
    return s


def rand_state(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v, generator=g) * (0.02 if len(v) > 1 else 1.0) + (1.0 if "norm" in k else 0.0)
            for k, v in shapes.items()}


def tiny_shapes(P):
    return backbone_shapes(D, LAYERS, CLASSES, C, K, GRID * GRID, P) | head_shapes(D, 2, 1, D, K, P)


def write_official(tmp, P, shapes=None, args=None):
    """An official-shaped .pt ({model, ema, optimizer, epochs, args}) and a separate tokenizer .pt."""
    shapes = shapes or tiny_shapes(P)
    vae = rand_state(vae_shapes(), 5)
    # the EMA's copy of the frozen tokenizer drifted in the last bits: the `model` copy is the tokenizer itself
    ema = rand_state(shapes, 1) | {f"vae.{k}": v * (1 + 2 ** -20) for k, v in vae.items()}
    model = rand_state(shapes, 2) | {f"vae.{k}": v for k, v in vae.items()}
    ns = argparse.Namespace(model="BitDance-custom", parallel_num=P, parallel_mode="patch", patch_size=1,
                            image_size=8, perturb_rate=0.1, P_mean=-0.8, P_std=0.8, diff_batch_mul=4,
                            results_dir=pathlib.PurePosixPath("/results/x"), lr=6e-4) if args is None else args
    opt = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}}, "param_groups": [{"lr": 1e-4}]}
    src = tmp / f"BitDance_{P}x.pt"
    torch.save({"model": model, "ema": ema, "optimizer": opt, "epochs": 800, "args": ns}, src)
    tok = rand_state(vae_shapes(), 6)  # differs from the embedded vae.* on purpose: the file must win
    tok_path = tmp / "ae_tiny.pt"
    torch.save({"state_dict": tok}, tok_path)
    return src, tok_path, ema, model, tok


def load_converted(path):
    pipe = BitDancePipeline.from_pretrained(path)  # tokenizer and generator both loaded strictly
    return pipe.tokenizer, pipe.model


def run_cli(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("P", [1, 4, 16])
def test_convert_loads_ema_strictly_and_samples_a_grid(tmp_path, capsys, P):
    src, tok_path, ema, model_sd, tok_sd = write_official(tmp_path, P)
    dst = tmp_path / "converted"
    code, out, err = run_cli(["convert-official", src, dst, "--tokenizer", tok_path, "--any-size"], capsys)
    assert code == 0, err
    assert "custom-128" in out and "ema weights" in out
    tok, gen = load_converted(dst)  # both from_pretrained: strict
    c = gen.config
    assert (c.parallel, c.dim, c.n_layers, c.n_heads, c.class_tokens, c.num_classes, c.grid_size) == (
        P, D, LAYERS, 2, C, CLASSES, (GRID, GRID))
    got = gen.state_dict()
    for k in ("cls_embedding.weight", "layers.1.feed_forward.w2.weight", "head.net.final_layer.linear.weight"):
        assert torch.equal(got[k], ema[k]) and not torch.equal(got[k], model_sd[k])  # ema, not model
    assert all(torch.equal(got[k], ema[k]) for k in got)
    assert torch.equal(tok.state_dict()["decoder.conv_out.weight"], tok_sd["decoder.conv_out.weight"])
    assert tok.config.resolution == 8
    # official sampling defaults stored with the generator (B's setting for this parallel count)
    assert c.cfg_scale == {1: 3.2, 4: 3.9, 16: 6.1}[P] and c.cfg_schedule == "linear" and c.num_sampling_steps == 100
    index = read_json(dst / "model_index.json")
    args = index["official"]["args"]  # the Namespace was read; its Path became an inert placeholder
    assert args["lr"] == 6e-4 and args["results_dir"] == "<pathlib.PurePosixPath (not loaded)>"
    assert index["official"]["epochs"] == 800 and index["official"]["weights"] == "ema"
    codes = generate(gen, torch.arange(4), num_steps=2, generator=torch.Generator().manual_seed(0), progress=False)
    assert codes.shape == (4, K, GRID, GRID) and set(codes.unique().tolist()) <= {-1.0, 1.0}
    images = tok.decode(codes)
    assert images.shape == (4, 3, 8, 8) and torch.isfinite(images).all()
    png = save_image_grid(images, tmp_path / "grid.png", nrow=2)
    assert png.stat().st_size > 0


def test_embedded_vae_is_the_default_tokenizer_and_no_ema_falls_back(tmp_path, capsys):
    src, _, ema, model_sd, _ = write_official(tmp_path, 4)
    code, _, err = run_cli(["convert-official", src, tmp_path / "a", "--any-size", "--no-ema"], capsys)
    assert code == 0, err
    tok, gen = load_converted(tmp_path / "a")
    assert torch.equal(gen.state_dict()["norm.weight"], model_sd["norm.weight"])
    assert torch.equal(tok.state_dict()["encoder.conv_in.weight"], model_sd["vae.encoder.conv_in.weight"])
    # with the EMA generator too, the tokenizer is the frozen `model` copy; so it is when the whole file is
    # given as a tokenizer (a .pt with an argparse `args`, read with weights_only)
    assert run_cli(["convert-official", src, tmp_path / "b", "--any-size"], capsys)[0] == 0
    tok_b, gen_b = load_converted(tmp_path / "b")
    assert torch.equal(gen_b.state_dict()["norm.weight"], ema["norm.weight"])
    whole = ImageTokenizer.from_official(src)
    for t in (tok_b, whole):
        assert all(torch.equal(v, model_sd[f"vae.{k}"]) for k, v in t.state_dict().items())
    assert read_json(tmp_path / "b" / "model_index.json")["official"]["tokenizer"] == f"{src.name} (vae.*)"
    # converting twice into the same folder needs --force
    code, _, err = run_cli(["convert-official", src, tmp_path / "a", "--any-size"], capsys)
    assert code == 2 and "--force" in err


def test_wrapper_prefixes_and_an_empty_query_token_are_dropped(tmp_path, capsys):
    """A file saved from a DDP / torch.compile wrapper, with the 1x models' empty query_token, converts as usual."""
    src, tok_path, ema, *_ = write_official(tmp_path, 1)
    obj = torch.load(src, weights_only=False)
    obj["ema"] = {f"module._orig_mod.{k}": v for k, v in ema.items()} | {"module.query_token": torch.zeros(1, 0, D)}
    torch.save(obj, src)
    code, _, err = run_cli(["convert-official", src, tmp_path / "o", "--tokenizer", tok_path, "--any-size"], capsys)
    assert code == 0, err
    got = load_converted(tmp_path / "o")[1].state_dict()
    assert "query_token" not in got and all(torch.equal(v, ema[k]) for k, v in got.items())
    # the same file as a tokenizer: its frozen `model` copy of module.vae.* (not a stray top-level key)
    model_sd = obj["model"]
    obj["model"] = {f"module.{k}": v for k, v in model_sd.items()}
    torch.save(obj, src)
    tok = ImageTokenizer.from_official(src)
    assert all(torch.equal(v, model_sd[f"vae.{k}"]) for k, v in tok.state_dict().items())


def test_time_shift_from_args_reaches_the_sampler_grid(tmp_path, capsys):
    """time_shift is not training-only: the official sampler shifts its time grid with it."""
    src, *_ = write_official(tmp_path, 4, args=argparse.Namespace(parallel_num=4, time_shift=3.0))
    assert run_cli(["convert-official", src, tmp_path / "o", "--any-size"], capsys)[0] == 0
    _, gen = load_converted(tmp_path / "o")
    flow = gen.head.flow
    assert gen.config.time_shift == 3.0 and flow.config.time_shift == 3.0
    shifted, plain = flow.timestep_grid(10)[0], RectifiedFlow().timestep_grid(10)[0]
    assert (shifted[1:-1] < plain[1:-1]).all()  # s > 1 moves every inner time toward the noise end


@pytest.mark.parametrize("name", list(OFFICIAL_MODELS))
def test_released_models_are_recognised_from_shapes_on_meta(name):
    from bitdance.models.transformer import BITDANCE_PRESETS, BitDance

    m = OFFICIAL_MODELS[name]
    # the state dict written from the reference's size table (ref §3.1), not from our module
    dim, layers, head_depth, n_adaln = {"B": (768, 24, 6, 2), "L": (1024, 32, 8, 2), "H": (1280, 40, 12, 3)}[m.size]
    spec = backbone_shapes(dim, layers, 1000, 64, 32, 256, m.parallel) | head_shapes(dim, head_depth, n_adaln, dim,
                                                                                     32, m.parallel)
    state = {k: torch.empty(shape, device="meta") for k, shape in spec.items()}
    with torch.device("meta"):
        ours = BitDance(BITDANCE_PRESETS[m.size](parallel=m.parallel)).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == spec  # and our module has exactly those
    config, got = infer_official_config(state, "x.pt", args={"parallel_num": m.parallel})
    assert got == name
    ref = {"B-1x": 3.2, "B-4x": 3.9, "B-16x": 6.1, "L-1x": 4.0, "H-1x": 4.55}[name]  # ref §3.1 table
    assert (config.cfg_scale, config.cfg_schedule, config.num_sampling_steps) == (ref, "linear", 100)
    assert config.n_heads * 64 == config.dim and config.head_width == config.dim
    with pytest.raises(UserError, match="not B-4x|not H-1x"):
        infer_official_config(state, "x.pt", model_name="B-4x" if name != "B-4x" else "H-1x")
    # a layer removed: refused with the field that disagrees
    with pytest.raises(UserError, match="n_layers"):
        infer_official_config({k: v for k, v in state.items() if not k.startswith(f"layers.{config.n_layers - 1}.")},
                              "x.pt")


def test_wrong_files_are_refused_with_one_line(tmp_path, capsys):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    code, _, err = run_cli(["convert-official", text, tmp_path / "o1"], capsys)
    assert code == 2 and err.count("\n") == 1 and "cannot read" in err

    other = tmp_path / "resnet.pt"
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}, "epochs": 3}, other)
    code, _, err = run_cli(["convert-official", other, tmp_path / "o2"], capsys)
    assert code == 2 and err.count("\n") == 1 and "not an official BitDance ImageNet checkpoint" in err

    # width 640 is no released preset
    wide = backbone_shapes(640, 1, 2, 1, K, 4, 1) | head_shapes(64, 1, 1, 640, K, 1)
    src, *_ = write_official(tmp_path, 1, shapes=wide, args={"parallel_num": 1})
    code, _, err = run_cli(["convert-official", src, tmp_path / "o3"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "layers.0 width 640 matches no preset (B 768, L 1024, H 1280)" in err
    assert not (tmp_path / "o3").exists()

    # a training flag that is not a number (a None is taken as unset)
    for bad, message in ((dict(P_mean="-0.8x"), "P_mean='-0.8x' is not a number"),
                         (dict(diff_batch_mul=1.5), "diff_batch_mul=1.5 is not a whole number")):
        src, *_ = write_official(tmp_path, 4, args=argparse.Namespace(parallel_num=4, patch_size=None,
                                                                      time_shift=None, **bad))
        code, _, err = run_cli(["convert-official", src, tmp_path / "o4", "--any-size"], capsys)
        assert code == 2 and err.count("\n") == 1 and message in err


def test_mismatched_shapes_are_refused_with_one_line(tmp_path, capsys):
    shapes = tiny_shapes(4)
    shapes["layers.1.feed_forward.w2.weight"] = (D, 100)
    src, tok, *_ = write_official(tmp_path, 4, shapes=shapes)
    code, _, err = run_cli(["convert-official", src, tmp_path / "o", "--tokenizer", tok, "--any-size"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "layers.1.feed_forward.w2.weight has shape (128, 100)" in err
    # the head says per-token MLP while query_token says 4x
    bad = {k: v for k, v in tiny_shapes(4).items() if not k.startswith("head.")} | head_shapes(D, 2, 1, D, K, 1)
    src, *_ = write_official(tmp_path, 4, shapes=bad)
    code, _, err = run_cli(["convert-official", src, tmp_path / "o", "--any-size"], capsys)
    assert code == 2 and "head layout" in err
    # a class embedding that is not C x width, and a position table that is not a square grid: each says which
    for name, shape, message in [("cls_embedding.weight", (CLASSES + 1, C * D + 1), "cls_embedding width"),
                                 ("pos_for_diff.weight", (GRID * GRID - 1, D), "not a square token grid")]:
        src, *_ = write_official(tmp_path, 4, shapes=tiny_shapes(4) | {name: shape})
        code, _, err = run_cli(["convert-official", src, tmp_path / "o", "--any-size"], capsys)
        assert code == 2 and message in err and err.count("\n") == 1
        assert ("square" in err) == (name == "pos_for_diff.weight")
    # training flags that contradict the weights
    src, *_ = write_official(tmp_path, 4, args=argparse.Namespace(parallel_num=16))
    code, _, err = run_cli(["convert-official", src, tmp_path / "o", "--any-size"], capsys)
    assert code == 2 and "parallel_num=16" in err


SAMPLE_ARGS = ["--per-class", "3", "--num-classes", "3", "--per-proc-batch-size", "2", "--num-steps", "2",
               "--no-progress", "--device", "cpu"]


def test_sample_ddp_two_gloo_processes_then_resume_in_one(tmp_path, capsys):
    src, tok, *_ = write_official(tmp_path, 16)
    dst = tmp_path / "m"
    assert run_cli(["convert-official", src, dst, "--tokenizer", tok, "--any-size"], capsys)[0] == 0
    out = tmp_path / "s" / "samples.npz"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "bitdance.cli",
           "sample-ddp", "--model", str(dst), "--out", str(out), "--seed", "7", *SAMPLE_ARGS]
    r = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    data = np.load(out)
    images, labels = data["arr_0"], data["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (9, 8, 8, 3)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # label order, per_class each
    chunks = sorted((tmp_path / "s" / "samples.chunks").glob("*.npz"))
    assert [p.name for p in chunks] == ["0000000.npz", "0000002.npz", "0000004.npz", "0000006.npz", "0000008.npz"]
    assert len({images[i].tobytes() for i in range(9)}) == 9  # no two samples share noise

    # resume in one process (no torchrun): only the deleted chunk is redone, with identical pixels
    kept = {p: p.stat().st_mtime_ns for p in chunks if p.name != "0000004.npz"}
    (tmp_path / "s" / "samples.chunks" / "0000004.npz").unlink()
    out.unlink()
    code, _, err = run_cli(["sample-ddp", "--model", dst, "--out", out, "--seed", "7", *SAMPLE_ARGS], capsys)
    assert code == 0, err
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())
    again = np.load(out)
    assert np.array_equal(again["arr_0"], images) and np.array_equal(again["arr_1"], labels)

    # other settings into the same chunk folder are refused
    code, _, err = run_cli(["sample-ddp", "--model", dst, "--out", out, "--seed", "8", *SAMPLE_ARGS], capsys)
    assert code == 2 and "seed 7 -> 8" in err and err.count("\n") == 1
    code, _, err = run_cli(["sample-ddp", "--model", dst, "--out", out, "--seed", "7", "--temperature", "0.5",
                            *SAMPLE_ARGS], capsys)
    assert code == 2 and "temperature 1.0 -> 0.5" in err
    # a temperature reaches the sampler: another file, other pixels
    other = tmp_path / "t" / "samples.npz"
    # (a guidance scale no sampler takes fails before the settings are written, so the folder stays usable)
    code, _, err = run_cli(["sample-ddp", "--model", dst, "--out", other, "--seed", "7", "--cfg-scale", "0.5",
                            *SAMPLE_ARGS], capsys)
    assert code == 2 and "cfg scale must be finite and >= 1" in err and not (tmp_path / "t" / "samples.chunks").exists()
    assert run_cli(["sample-ddp", "--model", dst, "--out", other, "--seed", "7", "--temperature", "0.5",
                    *SAMPLE_ARGS], capsys)[0] == 0
    assert not np.array_equal(np.load(other)["arr_0"], images)
    # so is another model converted into the same folder: neither the finished .npz nor the chunks are reused
    assert run_cli(["convert-official", src, dst, "--tokenizer", tok, "--any-size", "--force", "--num-steps", "3"],
                   capsys)[0] == 0
    code, _, err = run_cli(["sample-ddp", "--model", dst, "--out", out, "--seed", "7", *SAMPLE_ARGS], capsys)
    assert code == 2 and "model_files" in err


def test_converted_model_samples_through_the_pipeline_cli(tmp_path, capsys):
    pytest.importorskip("bitdance.commands.generator")  # `bitdance sample` (another engineer's module)
    src, tok, *_ = write_official(tmp_path, 16)
    dst = tmp_path / "m"
    argv = ["convert-official", src, dst, "--tokenizer", tok, "--any-size", "--num-steps", "2"]
    assert run_cli(argv, capsys)[0] == 0
    code, _, err = run_cli(["sample", "--model", dst, "--class-label", "7", "--num-images", "2",
                            "--out", tmp_path / "g.png"], capsys)
    assert code == 0, err
    assert (tmp_path / "g.png").stat().st_size > 0


def test_parameter_count_of_converted_tiny_model_matches_the_file(tmp_path, capsys):
    src, tok, ema, *_ = write_official(tmp_path, 4)
    assert run_cli(["convert-official", src, tmp_path / "m", "--tokenizer", tok, "--any-size"], capsys)[0] == 0
    _, gen = load_converted(tmp_path / "m")
    assert count_parameters(gen) == sum(v.numel() for k, v in ema.items() if not k.startswith("vae."))
