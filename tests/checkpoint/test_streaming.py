"""Loading streams: each tensor is converted and placed as it is read, each layer laid out as it completes, and
the mapped file pages behind what was converted are given back; memory stays near the weights as they end up.
Writing streams too: safetensors files a tensor at a time."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from codellama import ModelArgs, load_model
from codellama.checkpoint import Loaded, read_tensors
from codellama.formats import open_checkpoint
from codellama.formats.hf import SafetensorsWriter
from codellama.formats.source import file_backed, release_pages
from codellama.quantize import QUANTIZE_CHUNK, QuantConfig

from conftest import ROOT
from helpers import CONFIGS, benchmark, random_state_dict, write_checkpoint


def resident_bytes(path) -> int:
    """Bytes of ``path``'s mappings resident in this process (from /proc/self/smaps)."""
    total, inside = 0, False
    real = os.path.realpath(path)
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and ":" not in fields[0]:
                inside = len(fields) >= 6 and fields[5] == real
            elif inside and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
    return total


linux = pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux's /proc/self/smaps")


@linux
def test_release_pages_gives_back_mapped_pages_and_never_changes_a_value(tmp_path):
    path = write_checkpoint(tmp_path / "hf", ModelArgs(dim=512, n_layers=1, n_heads=4, vocab_size=4096), "hf")
    file = os.path.join(path, "model.safetensors")
    handle = safe_open(file, "pt")
    t = handle.get_tensor("model.embed_tokens.weight")  # 8 MiB, a view of the mapped file
    want = t.clone()
    assert t.sum() != 0 and resident_bytes(file) >= t.numel() * 4 * 0.9
    released = release_pages([t], [file])
    assert released >= t.numel() * 4 * 0.9 and resident_bytes(file) < 0.1 * t.numel() * 4
    assert torch.equal(t, want)  # read again from the page cache: the same values
    anon = want.clone()
    assert release_pages([anon], [file]) == 0 and torch.equal(anon, want)  # not a mapping of the file: untouched
    assert release_pages([t], [str(tmp_path / "other")]) == 0


@linux
def test_loading_keeps_only_the_pages_the_model_still_reads_from_the_file(tmp_path):
    """bf16 on disk, fp32 in the model: every tensor is converted, so no page of the file stays resident."""
    args = ModelArgs(dim=256, n_layers=4, n_heads=4, vocab_size=512)
    path = write_checkpoint(tmp_path / "hf", args, "hf", dtype=torch.bfloat16)
    file = os.path.join(path, "model.safetensors")
    source = open_checkpoint(path)  # held open, so the mapping outlives the load
    model = load_model(source, device="cpu", dtype="fp32")
    assert resident_bytes(file) < 64 * 1024, resident_bytes(file)
    bf16 = load_model(source, device="cpu", dtype="bf16", optimize=False)  # read in place: the model is the file
    kept = sum(t.numel() * 2 for t in bf16.parameters() if file_backed(t))  # (not wq, wk: HF's rows unpermuted)
    assert kept > 0.7 * os.path.getsize(file)
    assert kept * 0.9 < resident_bytes(file) <= os.path.getsize(file) + 4096  # (the last page, whole)
    assert torch.equal(bf16.layers[1].attention.wo.weight.float(), model.layers[1].attention.wo.weight)


@linux
def test_a_pre_quantized_int8_checkpoint_is_read_in_place(tmp_path):
    """int8 codes stay views of the mapped file (the native kernel reads them row by row; not fused, which would
    copy them): loading copies only HF's permuted q/k rows and the float tensors; logits are a copy's."""
    from codellama import cpu_kernels
    if not cpu_kernels.available("int8"):
        pytest.skip("the native int8 kernel cannot be built here")
    from codellama.cpu import optimize_for_cpu
    from codellama.quantize import Int8Linear
    args = ModelArgs(dim=256, n_layers=2, n_heads=4, vocab_size=512)
    path = write_checkpoint(tmp_path / "int8", args, "hf", dtype=torch.bfloat16, quantize=QuantConfig("int8"))
    source = open_checkpoint(path)  # held open, so the mapping outlives the load
    model = load_model(source, device="cpu", dtype="bf16")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, Int8Linear)}
    in_place = {name for name, m in layers.items() if file_backed(m.weight)}
    assert in_place == {name for name in layers if not name.endswith(("wq", "wk"))}, sorted(in_place)
    copied = load_model(path, device="cpu", dtype="bf16", optimize=False)
    for m in copied.modules():
        if isinstance(m, Int8Linear):
            m.weight = m.weight.clone()  # the codes in memory of their own
    copied = optimize_for_cpu(copied)
    for tokens in (torch.arange(3)[None], torch.arange(13)[None]):  # streamed rows; packed tiles
        assert torch.equal(model(tokens), copied(tokens))
    codes = sum(layers[name].weight.numel() for name in in_place)  # read by now, from the file's pages
    assert resident_bytes(os.path.join(path, "model.safetensors")) >= 0.9 * codes


def test_transforms_see_each_layer_as_it_completes_then_the_model(tmp_path):
    args = CONFIGS["mha"]
    path = write_checkpoint(tmp_path / "meta", args, "meta")
    seen = []

    def step(module):
        loaded = [n for n, t in module.named_parameters() if not t.is_meta]
        pending = sum(t.is_meta for t in module.parameters())
        seen.append((type(module).__name__, len(loaded), pending))

    load_model(path, device="cpu", transforms=[step])
    assert [s[0] for s in seen] == ["TransformerBlock"] * args.n_layers + ["Transformer"]
    assert all(pending == 0 and loaded == 9 for _, loaded, pending in seen[:-1])  # each layer whole when it runs


@pytest.mark.parametrize("layout", ["hf", "meta"])
@pytest.mark.parametrize("config", [QuantConfig("int8"), QuantConfig("int4", 32, include_output=True,
                                                                        output_scheme="int8", include_embeddings=True)])
def test_quantizing_as_tensors_arrive_is_quantizing_the_loaded_model(tmp_path, layout, config):
    from codellama.quantize import quantize_model
    args = CONFIGS["odd"]
    path = write_checkpoint(tmp_path / layout, args, layout, shards=1)
    streamed = load_model(path, device="cpu", dtype="bf16", quantize=config, optimize=False)
    after = quantize_model(load_model(path, device="cpu", dtype="bf16", optimize=False), config)
    a, b = streamed.state_dict(), after.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_read_tensors_checks_a_quantized_layers_float_weight_against_the_layer(tmp_path):
    from codellama.checkpoint import build_on_meta, quantized_layers
    from codellama.quantize import quantize_model
    args = CONFIGS["mha"]
    path = write_checkpoint(tmp_path / "hf", args, "hf")
    source = open_checkpoint(path)
    model = quantize_model(build_on_meta(args), QuantConfig("int4", 32))
    quantized = quantized_layers(model)
    quantized["layers.0.attention.wo"] = (quantized["layers.0.attention.wo"][0], (64, 60))  # a layer of 60 inputs
    with pytest.raises(ValueError, match=r"tensor layers.0.attention.wo.weight has shape \(64, 64\) in the "
                                         r"checkpoint, the model expects \(64, 60\)"):
        next(read_tensors(source, model.state_dict(), device=torch.device("cpu"), dtype=torch.float32,
                          quantized=quantized))
    first = next(read_tensors(source, model.state_dict(), device=torch.device("cpu"), dtype=torch.float32,
                              quantized=quantized_layers(model)))
    assert isinstance(first, Loaded) and first.unit == "tok_embeddings" and first.release is not None


# ----------------------------------------------------------------------------- writing
def test_safetensors_written_a_tensor_at_a_time_read_back_with_safetensors(tmp_path):
    tensors = {"b16": torch.randn(3, 5).bfloat16(), "codes": torch.randint(0, 255, (7, 3), dtype=torch.uint8),
               "f32": torch.randn(4), "i8": torch.randint(-5, 5, (2, 2), dtype=torch.int8), "f64": torch.randn(1).double()}
    plan = {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}
    writer = SafetensorsWriter(str(tmp_path / "x.safetensors"), plan)
    for k in reversed(list(tensors)):  # any order
        writer.write(k, tensors[k])
    writer.close()
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(tensors)
        for k, t in tensors.items():
            got = f.get_tensor(k)
            assert got.dtype == t.dtype and torch.equal(got, t)
    writer = SafetensorsWriter(str(tmp_path / "y.safetensors"), plan)
    with pytest.raises(ValueError, match=r"f32: got \(5,\) torch.float32, announced \(4,\) torch.float32"):
        writer.write("f32", torch.randn(5))
    with pytest.raises(ValueError, match=r"tensor\(s\) \['b16', 'codes', 'f32', 'f64', 'i8'\] announced but never written"):
        writer.close()


def test_a_random_checkpoint_written_quantized_is_the_float_one_quantized(tmp_path):
    """write_checkpoint(quantize=...) quantizes each tensor as it is made (a 13B int4 with no 13B bf16 on disk):
    the same files as quantize_checkpoint of the float checkpoint."""
    from safetensors.torch import load_file
    from codellama.save import quantize_checkpoint
    args = CONFIGS["gqa"]
    config = QuantConfig("int4", 32, include_output=True, output_scheme="int8")
    direct = write_checkpoint(tmp_path / "direct", args, "hf", dtype=torch.bfloat16, quantize=config)
    floats = write_checkpoint(tmp_path / "float", args, "hf", dtype=torch.bfloat16)
    quantize_checkpoint(floats, tmp_path / "quantized", config)
    a, b = (load_file(os.path.join(p, "model.safetensors")) for p in (direct, tmp_path / "quantized"))
    assert sorted(a) == sorted(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="a quantized checkpoint is written in the HF layout, not 'meta'"):
        write_checkpoint(tmp_path / "meta", args, "meta", quantize=config)


# ----------------------------------------------------------------------------- the memory ceiling
MEASURE = benchmark("memory_sampler").MEMORY_SAMPLER + r"""
import gc, json, tempfile, torch
from codellama import ModelArgs, load_model
from codellama.save import quantize_checkpoint
from codellama.testing import write_checkpoint
what, path, dtype, quantize = sys.argv[1:]
with tempfile.TemporaryDirectory() as tmp:  # a small load first: the code and thread pools it pages in are not the load's
    small = write_checkpoint(os.path.join(tmp, "small"), ModelArgs(dim=128, n_layers=1, n_heads=2, vocab_size=256), "hf",
                             dtype=torch.bfloat16)
    if what == "quantize_checkpoint":
        quantize_checkpoint(small, os.path.join(tmp, "q"), "int4")
    else:
        load_model(small, device="cpu", dtype=dtype, quantize=None if quantize == "-" else quantize)
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS
base_rss, base_anon = status("VmRSS:"), status("RssAnon:")
start_sampler()
if what == "quantize_checkpoint":
    quantize_checkpoint(path, path + "-int4", "int4")
    nbytes = 0
else:
    model = load_model(path, device="cpu", dtype=dtype, quantize=None if quantize == "-" else quantize)
    nbytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
print(json.dumps({"rss": status("VmHWM:") - base_rss, "anon": peak_anon[0] - base_anon, "weights": nbytes}))
"""


def measure(what: str, path, dtype: str = "-", quantize: str = "-") -> dict:
    """``MEASURE`` in a fresh process: peak rss and anon above the level after imports, and the weights' bytes."""
    r = subprocess.run([sys.executable, "-c", MEASURE, what, str(path), dtype, quantize], capture_output=True,
                       text=True, timeout=600, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def layer_bytes(args: ModelArgs) -> int:
    """The bytes of one transformer layer of ``args`` in bf16."""
    one = ModelArgs(**{**args.__dict__, "n_layers": 1})
    return sum(t.numel() * 2 for k, t in random_state_dict(one, dtype=torch.bfloat16).items() if k.startswith("layers."))


@linux
def test_a_checkpoint_converted_on_load_peaks_at_its_weights_not_file_plus_weights(tmp_path):
    """~0.2 GB of bf16 weights loaded as fp32 in a fresh process (after a small load: code paged in and thread
    pools are not the load's): every tensor is converted, and peak resident memory, the mapped file's pages
    included, stays under 1.2× the fp32 weights plus one fp32 layer. Reading the file whole and converting
    after (1.5×, plus the converting copy) cannot pass."""
    args = ModelArgs(dim=1024, n_layers=8, n_heads=8, vocab_size=4096)
    hf = write_checkpoint(tmp_path / "hf", args, "hf", dtype=torch.bfloat16)
    m = measure("load", hf, "fp32", "-")
    ceiling = 1.2 * m["weights"] + 2 * layer_bytes(args)
    assert m["rss"] < ceiling, (m, ceiling)


@pytest.mark.slow
@linux
def test_a_large_checkpoint_loads_within_a_fifth_more_than_its_weights(tmp_path):
    """~0.6 GB of bf16 weights in 24 layers, loaded in a fresh process (after a small load): peak resident memory
    (mapped file pages included) at most 1.2× the weights as they end up, plus one layer in bf16; the same for
    int4 quantized on load (plus the quantizer's float32 temporaries, a constant), and for Meta's two shards."""
    args = ModelArgs(dim=1024, n_layers=24, n_heads=8, vocab_size=2048)
    layer = layer_bytes(args)
    hf = write_checkpoint(tmp_path / "hf", args, "hf", dtype=torch.bfloat16)
    meta = write_checkpoint(tmp_path / "meta", args, "meta", shards=2, dtype=torch.bfloat16)
    for what, path, dtype, quantize in (("load", hf, "bf16", "-"), ("load", meta, "bf16", "-"),
                                        ("load", hf, "fp32", "-"), ("load", hf, "bf16", "int4"),
                                        ("quantize_checkpoint", hf, "-", "-")):
        m = measure(what, path, dtype, quantize)
        if what == "quantize_checkpoint":  # a weight and its codes at a time (and the quantizer's temporaries)
            assert m["anon"] < 0.25 * args.num_params() * 2, (m, layer)  # never the model
            continue
        ceiling = 1.2 * m["weights"] + layer
        if quantize != "-":  # and the quantizer's float32 temporaries: a few chunks of QUANTIZE_CHUNK weights
            ceiling += 4 * QUANTIZE_CHUNK * 4
        assert m["rss"] < ceiling, (what, path, dtype, quantize, m, ceiling)
