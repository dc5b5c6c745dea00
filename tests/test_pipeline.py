"""BitDancePipeline: save/load round trip, output types, defaults, class names, built-in model, errors."""

from pathlib import Path

import numpy as np
import pytest
import torch
from test_transformer import randomize_head  # the head's zeroed output layers, randomised

import bitdance.pipeline as pl
from bitdance.models.autoencoder import ImageTokenizer, TokenizerConfig
from bitdance.models.quantizer import indices_to_bits
from bitdance.models.transformer import BITDANCE_PRESETS, BitDance
from bitdance.pipeline import BitDancePipeline, ImageOutput, decode_codes
from bitdance.sampling import generate
from bitdance.utils import UserError, to_uint8

NAMES = ["circle", "square", "ring"]


def make_pipeline(parallel=4, quantizer="binary", seed=0):
    """Random tiny components; the head's zero-initialised output layers are randomised so samples depend on
    the class (a fresh head outputs exactly 0)."""
    torch.manual_seed(seed)
    tok = ImageTokenizer(TokenizerConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=8, resolution=16,
                                         quantizer=quantizer, group_size=4))
    model = BitDance(BITDANCE_PRESETS["tiny"](parallel=parallel, num_classes=3, num_sampling_steps=3, cfg_scale=2.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.head.parameters():
            if p.abs().max() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return BitDancePipeline(tok, model, NAMES)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def pipe():
    return make_pipeline()


def test_save_load_round_trip_samples_identically(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "p")
    for sub in ("model_index.json", "tokenizer/config.json", "tokenizer/model.safetensors",
                "generator/config.json", "generator/model.safetensors"):
        assert (tmp_path / "p" / sub).is_file(), sub
    loaded = BitDancePipeline.from_pretrained(tmp_path / "p")
    assert loaded.class_names == NAMES and loaded.num_classes == 3 and loaded.image_size == (16, 16)
    a = pipe([0, 1, 2, 2], generator=gen(1), output_type="pt", progress=False).images
    b = loaded([0, 1, 2, 2], generator=gen(1), output_type="pt", progress=False).images
    assert torch.equal(a, b)
    c = loaded([0, 1, 2, 2], generator=gen(2), output_type="pt", progress=False).images
    assert not torch.equal(a, c)  # the generator matters
    # a training run folder (holding model/) is accepted too
    (tmp_path / "run").mkdir()
    (tmp_path / "p").rename(tmp_path / "run" / "model")
    assert BitDancePipeline.from_pretrained(tmp_path / "run").class_names == NAMES


def test_output_types(pipe):
    pt = pipe([0, 2], generator=gen(), output_type="pt", progress=False).images
    assert pt.shape == (2, 3, 16, 16) and pt.dtype == torch.float32 and pt.abs().max() <= 1
    arr = pipe([0, 2], generator=gen(), output_type="np", progress=False).images
    assert isinstance(arr, np.ndarray) and arr.dtype == np.uint8 and arr.shape == (2, 16, 16, 3)
    assert np.array_equal(arr, to_uint8(pt).numpy())
    pil = pipe([0, 2], generator=gen(), output_type="pil", progress=False).images
    assert [im.size for im in pil] == [(16, 16)] * 2 and pil[0].mode == "RGB"
    assert np.array_equal(np.stack([np.asarray(im) for im in pil]), arr)
    out = pipe(1, generator=gen(), output_type="np", progress=False, return_dict=False)
    assert isinstance(out, tuple) and out[0].shape == (1, 16, 16, 3)
    assert isinstance(pipe([0], progress=False), ImageOutput)
    with pytest.raises(UserError, match="output_type"):
        pipe([0], output_type="jpeg")
    # the sampled token codes themselves, not decoded: the same draws as the images above
    codes = pipe([0, 2], generator=gen(), output_type="codes", progress=False).images
    k, (h, w) = pipe.tokenizer.config.z_channels, pipe.tokenizer.config.token_grid()
    assert codes.shape == (2, k, h, w) and codes.dtype == torch.float32 and set(codes.unique().tolist()) == {-1, 1}
    assert torch.equal(codes, generate(pipe.model, torch.tensor([0, 2]), generator=gen(), progress=False))
    assert not codes.is_inference()  # usable outside inference mode, like the images


def test_defaults_come_from_the_generator_config(pipe):
    c = pipe.model.config
    a = pipe([0, 1], generator=gen(3), output_type="pt", progress=False).images
    b = pipe([0, 1], num_inference_steps=c.num_sampling_steps, guidance_scale=c.cfg_scale,
             cfg_schedule=c.cfg_schedule, generator=gen(3), output_type="pt", progress=False).images
    assert torch.equal(a, b)
    d = pipe([0, 1], guidance_scale=1.0, generator=gen(3), output_type="pt", progress=False).images
    assert not torch.equal(a, d)


def test_num_inference_steps_changes_the_diffusion_head_samples(pipe):
    assert pipe.model.config.head == "diffusion"
    one = pipe([0, 1], num_inference_steps=1, generator=gen(6), output_type="pt", progress=False).images
    two = pipe([0, 1], num_inference_steps=2, generator=gen(6), output_type="pt", progress=False).images
    assert not torch.equal(one, two)


def test_bitwise_head_warns_that_it_has_no_flow_steps(pipe):
    torch.manual_seed(0)
    model = BitDance(BITDANCE_PRESETS["tiny"](head="bitwise", num_classes=3, token_bits=8))
    bitwise = BitDancePipeline(pipe.tokenizer, model, NAMES)
    with pytest.warns(UserWarning, match="bitwise head"):
        a = bitwise([0], num_inference_steps=7, generator=gen(), output_type="pt", progress=False).images
    b = bitwise([0], generator=gen(), output_type="pt", progress=False).images
    assert torch.equal(a, b)  # the steps really are ignored


def test_class_names_and_labels(pipe):
    assert pipe.class_ids(["Ring", "circle", 1, "2"]) == [2, 0, 1, 2]
    assert pipe.class_ids(np.int64(1)) == pipe.class_ids(torch.tensor(1)) == pipe.class_ids("square") == [1]
    assert pipe.class_ids(np.array([2, 0])) == pipe.class_ids([np.int64(2), torch.tensor(0)]) == [2, 0]
    by_name = pipe(["ring", "square"], generator=gen(4), output_type="pt", progress=False).images
    by_id = pipe([2, 1], generator=gen(4), output_type="pt", progress=False).images
    assert torch.equal(by_name, by_id)
    assert pipe(None, generator=gen(), output_type="pt", progress=False).images.shape[0] == 3  # one per class
    with pytest.raises(UserError, match="unknown class 'blob'"):
        pipe(["blob"])
    with pytest.raises(UserError, match="out of range"):
        pipe([3])
    for bad in (1.7, [0, 1.0], np.float32(1), torch.tensor(1.5), True, [np.bool_(False)], torch.tensor(True)):
        with pytest.raises(UserError, match="integer ids or class names"):
            pipe.class_ids(bad)


def test_class_names_that_look_like_numbers_are_names_first():
    """Class folders "1", "10", "2" sort as text: "10" is id 1, and asking for "1" must mean the class "1"."""
    base = make_pipeline()
    numeric = BitDancePipeline(base.tokenizer, base.model, ["1", "10", "2"])
    assert numeric.class_ids(["1", "10", "2", 1]) == [0, 1, 2, 1]
    assert numeric.class_ids(["0"]) == [0]  # not a name: read as an id


def test_cache_free_sampling_gives_the_same_images(pipe):
    a = pipe([0, 1], generator=gen(5), output_type="pt", progress=False).images
    b = pipe([0, 1], generator=gen(5), output_type="pt", progress=False, use_cache=False).images
    assert torch.allclose(a, b, atol=1e-5)


def test_builtin_model(monkeypatch, tmp_path, pipe):
    monkeypatch.setattr(pl, "builtin_path", lambda: tmp_path / "builtin")
    with pytest.raises(UserError, match="built-in model is not installed"):
        BitDancePipeline.from_pretrained("builtin")
    pipe.save_pretrained(tmp_path / "builtin")
    assert BitDancePipeline.from_pretrained("builtin").class_names == NAMES


def test_packaged_builtin_path_is_inside_the_package():
    import bitdance

    assert pl.builtin_path() == Path(bitdance.__file__).parent / "builtin"


def test_vq_tokenizer_tokens_are_index_bits():
    p = make_pipeline(quantizer="vq")
    idx = torch.randint(0, 16, (2, 2, 4, 4))  # (b, groups, h, w), 4-bit groups
    codes = indices_to_bits(idx, 4)  # (2, 8, 4, 4)
    with torch.no_grad():
        assert torch.equal(decode_codes(p.tokenizer, codes), p.tokenizer.decode_indices(idx))
    assert p([0], num_inference_steps=2, output_type="pt", progress=False).images.shape == (1, 3, 16, 16)


def test_loading_errors(tmp_path, pipe):
    with pytest.raises(UserError, match="model folder not found"):
        BitDancePipeline.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a BitDance pipeline folder"):
        BitDancePipeline.from_pretrained(tmp_path / "empty")
    pipe.save_pretrained(tmp_path / "broken")
    (tmp_path / "broken" / "generator" / "model.safetensors").unlink()
    with pytest.raises(UserError, match="needs config.json and model.safetensors"):
        BitDancePipeline.from_pretrained(tmp_path / "broken")
    other = ImageTokenizer(TokenizerConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=16))
    with pytest.raises(UserError, match="8-bit tokens, tokenizer gives 16"):
        BitDancePipeline(other, pipe.model)
    with pytest.raises(UserError, match="2 class names"):
        BitDancePipeline(pipe.tokenizer, pipe.model, ["a", "b"])


def test_to_returns_the_pipeline(pipe):
    assert pipe.to("cpu") is pipe and pipe.device.type == "cpu"
    assert pipe.to(dtype="float32").dtype == torch.float32


def test_generate_samples_takes_the_autocast_dtype(pipe):
    from bitdance.evaluation.npz import generate_samples

    try:
        images, labels, settings = generate_samples(pipe, 3, batch_size=3, dtype="bfloat16", progress=False)
        assert pipe.dtype == torch.bfloat16 and settings["dtype"] == "bfloat16"
        assert images.shape[0] == 3 and images.dtype == np.uint8 and labels.tolist() == [0, 1, 2]
    finally:
        pipe.to(dtype="float32")  # the fixture is shared


def make_guide(seed=1):
    torch.manual_seed(seed)
    return randomize_head(BitDance(BITDANCE_PRESETS["tiny"](parallel=4, num_classes=3, dim=32, n_layers=1)), seed)


def test_guide_model_saves_loads_and_is_the_default_guidance(tmp_path):
    guided = make_pipeline().set_guide(make_guide(), scale=2.5, schedule="constant")
    a = guided([0, 1, 2], generator=gen(1), output_type="codes", progress=False).images
    # the default is autoguidance at the guide's own scale and schedule, equal to asking for them
    same = guided([0, 1, 2], generator=gen(1), output_type="codes", progress=False, guidance="guide",
                  guidance_scale=2.5, cfg_schedule="constant").images
    cfg = guided([0, 1, 2], generator=gen(1), output_type="codes", progress=False, guidance="cfg").images
    plain = make_pipeline()([0, 1, 2], generator=gen(1), output_type="codes", progress=False).images
    assert torch.equal(a, same) and torch.equal(cfg, plain) and not torch.equal(a, cfg)

    guided.save_pretrained(tmp_path / "p")
    index = pl.read_json(tmp_path / "p" / "model_index.json")
    assert (index["guide"], index["guide_scale"], index["guide_schedule"]) == (["bitdance", "BitDance"], 2.5,
                                                                               "constant")
    loaded = BitDancePipeline.from_pretrained(tmp_path / "p")
    assert torch.equal(loaded([0, 1, 2], generator=gen(1), output_type="codes", progress=False).images, a)
    # a guide attached on load (a generator, pipeline or run folder) replaces the saved one at the saved scale...
    swapped = BitDancePipeline.from_pretrained(tmp_path / "p", guide_model=tmp_path / "p" / "generator")
    assert (swapped.guide_scale, swapped.guide_schedule) == (2.5, "constant")
    assert torch.equal(swapped.guide_model.head.net.input_proj.weight, loaded.model.head.net.input_proj.weight)
    # ...and without a saved guide, at the generator's cfg defaults
    make_pipeline().save_pretrained(tmp_path / "plain")
    attached = BitDancePipeline.from_pretrained(tmp_path / "plain", guide_model=tmp_path / "p")
    assert (attached.guide_scale, attached.guide_schedule) == (2.0, attached.model.config.cfg_schedule)
    assert torch.equal(attached.guide_model.head.net.input_proj.weight, loaded.model.head.net.input_proj.weight)


def test_guide_stored_in_int8_beside_a_float16_generator(tmp_path):
    from safetensors.torch import load_file

    guided = make_pipeline().set_guide(make_guide(), scale=2.5, schedule="constant")
    guided.save_pretrained(tmp_path / "p", dtype=torch.float16, guide_dtype=torch.int8)
    stored = {sub: load_file(str(tmp_path / "p" / sub / "model.safetensors")) for sub in ("generator", "guide")}
    assert {v.dtype for v in stored["generator"].values()} == {torch.float16}
    assert torch.int8 in {v.dtype for v in stored["guide"].values()}
    loaded = BitDancePipeline.from_pretrained(tmp_path / "p")
    assert torch.equal(loaded.model.head.net.input_proj.weight,
                       guided.model.head.net.input_proj.weight.half().float())
    a = loaded([0, 1, 2], generator=gen(1), output_type="codes", progress=False).images
    b = loaded([0, 1, 2], generator=gen(1), output_type="codes", progress=False).images
    assert torch.equal(a, b) and loaded.guide_kind() == "guide" and loaded.guide_scale == 2.5


def test_guide_errors(tmp_path, pipe):
    with pytest.raises(UserError, match="needs a guide model"):
        pipe([0], guidance="guide", progress=False)
    with pytest.raises(UserError, match="guidance must be one of"):
        pipe([0], guidance="auto", progress=False)
    with pytest.raises(UserError, match="guide model does not match the model: parallel"):
        make_pipeline().set_guide(BitDance(BITDANCE_PRESETS["tiny"](parallel=1, num_classes=3)))
    with pytest.raises(UserError, match="cfg scale must be finite"):
        make_pipeline().set_guide(make_guide(), scale=0.5)
    pipe.save_pretrained(tmp_path / "p")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no generator found"):
        BitDancePipeline.from_pretrained(tmp_path / "p", guide_model=tmp_path / "empty")
