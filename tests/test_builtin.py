"""The built-in Fashion-MNIST model: it ships with the package, loads offline and samples deterministically."""

import torch
from PIL import Image

from bitdance.cli import main
from bitdance.pipeline import BitDancePipeline, builtin_path
from bitdance.utils import count_parameters, read_safetensors


def test_builtin_model_is_packaged_and_small():
    root = builtin_path()
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert files == ["generator/config.json", "generator/model.safetensors", "guide/config.json",
                     "guide/model.safetensors", "model_index.json", "tokenizer/config.json",
                     "tokenizer/model.safetensors"]
    assert sum((root / f).stat().st_size for f in files) < 30 * 2**20  # the 30 MB budget
    stored = read_safetensors(root / "guide" / "model.safetensors")
    assert stored["head.net.input_proj.weight"].dtype == torch.int8


def test_builtin_generates_deterministically():
    pipe = BitDancePipeline.from_pretrained("builtin")
    assert pipe.num_classes == 10 and pipe.class_names[7] == "Sneaker"
    # the guide is the generator's own first training stage: the same network, stored in int8
    assert pipe.guide_kind() == "guide" and count_parameters(pipe.guide_model) == count_parameters(pipe.model)
    assert not torch.equal(pipe.guide_model.head.net.input_proj.weight, pipe.model.head.net.input_proj.weight)
    kwargs = dict(class_labels=["Sneaker", 8], num_inference_steps=4, output_type="pt", progress=False)
    a = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    b = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    c = pipe(generator=torch.Generator().manual_seed(1), **kwargs).images
    assert a.shape == (2, 1, 32, 32) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_quickstart_sample_command(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["sample", "--class-label", "0", "9", "--num-images", "2", "--steps", "4", "--seed", "0",
                 "--out", str(out), "--no-progress"]) == 0
    with Image.open(out) as im:
        assert im.width > 64 and im.height > 64
