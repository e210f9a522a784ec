"""Networks trained elsewhere: convert.py and train.py --init-from.

The fixtures in tests/data were made by the original code bases, which this project does not
contain: nvlabs_tiny.pkl by NVlabs' stylegan2-ada-pytorch (commit d72cc7d) as its training loop
pickles a snapshot (G, D, G_ema, augment_pipe, training_set_kwargs), a 32x32 RGB network with
z = w = 16, 2 mapping layers, channel_base 256, channel_max 16, num_fp16_res 2 and conv_clamp 256,
its weights, noise strengths, biases and w_avg perturbed at random so that every tensor counts,
and the module source it embeds replaced by a one-line placeholder (so no NVIDIA code is here, and
NVlabs' own loader cannot read it: it would need to run that source). nvlabs_tiny_ref.npz holds 4
latents and what the original computed from them in float32 with noise_mode='const': G_ema's and
G's images at truncation 1 and 0.5, and D's scores of the G_ema images. rosinality_tiny.pt was
saved by rosinality's stylegan2-pytorch (commit bef283a) model.py as its train.py saves (g, d,
g_ema, args as an argparse.Namespace, ada_aug_p), a 32x32 network with style_dim 16, 2 mapping
layers and its channel table divided by 32 (16 channels), perturbed the same way;
rosinality_tiny_ref.npz holds 4 latents, g_ema's images with its constant noise maps at truncation
1 and at 0.5 around the mean_latent it gives, and d's scores."""
import argparse
import io
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_user_error, smoke
from PIL import Image

import checkpoints
import convert
import dataset
import generate_images
import modules
import pretrained
import settings
import train
import training
import utils

DATA = Path(__file__).parent / "data"
NVLABS, ROSINALITY = DATA / "nvlabs_tiny.pkl", DATA / "rosinality_tiny.pt"
GREY_LEVEL = 2 / 255  # one step of the 8-bit images, in [-1, 1] units
LUMA = torch.tensor([0.299, 0.587, 0.114])  # ITU-R BT.601, as PIL's convert("L")


def reference(name):
    return {k: torch.from_numpy(v) for k, v in np.load(DATA / f"{name}_ref.npz").items()}


def converted(tmp_path, source, *flags):
    out = tmp_path / "converted" / f"{Path(source).stem}.pt"
    assert convert.main([str(source), str(out), *flags]) == 0
    state, _ = checkpoints.load_checkpoint(out)  # weights_only=True, as every script reads it
    D = checkpoints.load_discriminator(state, "cpu") if "D" in state else None
    return state, checkpoints.load_generator(state, "cpu"), D


# ---------------------------------------------------------------------------------------
# The same images and scores as the originals
# ---------------------------------------------------------------------------------------
@pytest.mark.determinism
@torch.no_grad()
def test_nvlabs_networks_compute_what_the_original_computed(tmp_path):
    ref = reference("nvlabs_tiny")
    state, G_ema, D = converted(tmp_path, NVLABS, "--channels", "keep")
    assert state["config"]["resample"] == "upfirdn" and state["config"]["conv_clamp"] == 256
    for psi, key in ((1.0, "G_ema_img"), (0.5, "G_ema_img_psi05")):
        assert (G_ema(ref["z"], truncation=psi, noise_mode="const") - ref[key]).abs().max() < GREY_LEVEL / 2
    G = checkpoints.load_network(type(G_ema), state, "G", state["model_args"]["G"])
    assert (G(ref["z"], noise_mode="const") - ref["G_img"]).abs().max() < GREY_LEVEL / 2
    torch.testing.assert_close(D(ref["G_ema_img"]), ref["D_score"], atol=1e-4, rtol=1e-5)


@pytest.mark.determinism
@torch.no_grad()
def test_rosinality_networks_compute_what_the_original_computed(tmp_path):
    ref = reference("rosinality_tiny")
    state, G_ema, D = converted(tmp_path, ROSINALITY, "--channels", "keep")
    assert (G_ema(ref["z"], noise_mode="const") - ref["g_ema_img"]).abs().max() < GREY_LEVEL / 2
    G_ema.mapping.w_avg.copy_(ref["mean_latent"])  # the original's truncation centre, drawn unseeded
    assert (G_ema(ref["z"], truncation=0.5, noise_mode="const") - ref["g_ema_img_psi05"]).abs().max() < GREY_LEVEL / 2
    torch.testing.assert_close(D(ref["g_ema_img"]), ref["d_score"], atol=1e-4, rtol=1e-5)


def test_rosinality_mean_w_is_estimated_from_seeded_latents(tmp_path):
    first, G, _ = converted(tmp_path / "a", ROSINALITY)
    again, _, _ = converted(tmp_path / "b", ROSINALITY)
    assert torch.equal(first["G_ema"]["mapping.w_avg"], again["G_ema"]["mapping.w_avg"])
    z = torch.randn(20000, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # within a few standard errors of the mean w of other latents
        assert (G.mapping(z).mean(0) - G.mapping.w_avg[0]).abs().max() < 0.05


@pytest.mark.determinism
def test_z_file_draws_the_originals_images(tmp_path, capsys):
    ref = reference("nvlabs_tiny")
    np.save(tmp_path / "z.npy", ref["z"].numpy())
    out = tmp_path / "Models" / "nvlabs.pt"
    assert convert.main([str(NVLABS), str(out), "--channels", "keep"]) == 0
    assert generate_images.main(["--checkpoint", str(out), "--z-file", str(tmp_path / "z.npy"),
                                 "--out-dir", str(tmp_path / "gen")]) == 0
    expected = utils.to_uint8(ref["G_ema_img"])
    for i in range(len(expected)):
        png = np.asarray(Image.open(tmp_path / "gen" / f"z{i:04d}.png")).astype(int)
        assert np.abs(png - expected[i]).max() <= 1


@pytest.mark.parametrize("bad", ["shape", "nan", "pickle", "missing"])
def test_a_bad_z_file_is_one_line(tmp_path, capsys, bad):
    out = tmp_path / "nvlabs.pt"
    assert convert.main([str(NVLABS), str(out)]) == 0
    z = tmp_path / "z.npy"
    if bad == "shape":
        np.save(z, np.zeros((3, 15)))
    elif bad == "nan":
        np.save(z, np.full((3, 16), np.nan))
    elif bad == "pickle":
        np.save(z, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    capsys.readouterr()
    code = generate_images.main(["--checkpoint", str(out), "--z-file", str(z), "--out-dir", str(tmp_path / "g")])
    assert_user_error(capsys, code, "--z-file")


@pytest.mark.determinism
@torch.no_grad()
def test_gray_networks_draw_the_luminance_and_score_like_the_rgb_ones(tmp_path):
    ref = reference("nvlabs_tiny")
    gray, G, D = converted(tmp_path / "gray", NVLABS)  # --channels gray is the default
    _, _, D_rgb = converted(tmp_path / "rgb", NVLABS, "--channels", "keep")
    assert gray["config"]["image_mode"] == "L" and gray["model_args"]["D"]["img_channels"] == 1
    luminance = torch.einsum("c,nchw->nhw", LUMA, ref["G_ema_img"])[:, None]
    assert (G(ref["z"], noise_mode="const") - luminance).abs().max() < 1e-4
    torch.testing.assert_close(D(luminance), D_rgb(luminance.expand(-1, 3, -1, -1)), atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# Nothing in a file runs; what does not map is named
# ---------------------------------------------------------------------------------------
class CreatesAFile:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("where", ["top", "inside"])
def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path, capsys, where):
    marker = tmp_path / "created"
    payload = CreatesAFile(marker) if where == "top" else {"G_ema": [1, 2, CreatesAFile(marker)], "D": None}
    evil = tmp_path / "network-snapshot.pkl"
    evil.write_bytes(pickle.dumps(payload))
    code = convert.main([str(evil), str(tmp_path / "out.pt")])
    assert_user_error(capsys, code, str(evil), "io.open", "refused", "nothing in it was run")
    code = train.main(smoke(tmp_path, tmp_path / "run", "--init-from", str(evil)))
    assert_user_error(capsys, code, "refused")
    assert not marker.exists() and not (tmp_path / "out.pt").exists()


class Calls:
    """A pickle that calls `fn(*args)` when loaded, through the global `fn` names."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def payloads(marker):
    """Globals of the modules a network pickle does hold (builtins, torch, NumPy), used to run code."""
    return {"builtins.exec": Calls(exec, f"open({str(marker)!r}, 'w')"),
            "builtins.eval": Calls(eval, f"open({str(marker)!r}, 'w')"),
            "builtins.getattr": Calls(getattr, 1, "real"),
            "torch.serialization.save": Calls(torch.save, [1], str(marker)),
            "numpy.save": Calls(np.save, str(marker), np.zeros(1))}


@pytest.mark.parametrize("name", sorted(payloads("x")))
def test_globals_of_allowed_modules_are_refused_all_the_same(tmp_path, name):
    marker = tmp_path / "created"
    evil = tmp_path / "network-snapshot.pkl"
    evil.write_bytes(pickle.dumps({"G_ema": payloads(marker)[name]}))
    with pytest.raises(settings.UserError, match="refused for safety"):
        pretrained.read_network_pickle(evil)
    assert not marker.exists() and not marker.with_suffix(".npy").exists()


class StorageBlob:
    """A tensor storage as torch pickles one (torch.storage._load_from_bytes), holding `data`."""

    def __init__(self, data):
        self.data = data

    def __reduce__(self):
        return (torch.storage._load_from_bytes, (self.data,))


def test_a_storage_blob_that_would_run_code_is_refused_in_plain_words(tmp_path, capsys):
    marker, blob = tmp_path / "created", io.BytesIO()
    torch.save(CreatesAFile(marker), blob)
    evil = tmp_path / "network-snapshot.pkl"
    evil.write_bytes(pickle.dumps({"G_ema": StorageBlob(blob.getvalue())}))
    line = assert_user_error(capsys, convert.main([str(evil), str(tmp_path / "out.pt")]), str(evil),
                             "a tensor storage that holds Python objects other than tensors", "refused for safety")
    assert "weights_only" not in line and "Re-running" not in line and not marker.exists()


def test_a_pickle_referring_to_outside_objects_is_refused(tmp_path):
    class Outside(pickle.Pickler):
        def persistent_id(self, obj):
            return "outside-object" if isinstance(obj, str) and obj == "x" else None

    path = tmp_path / "network-snapshot.pkl"
    with open(path, "wb") as f:
        Outside(f).dump({"G_ema": "x"})
    with pytest.raises(settings.UserError, match="refers to outside objects"):
        pretrained.read_network_pickle(path)


def test_a_checkpoint_holding_other_objects_is_refused(tmp_path, capsys):
    path = tmp_path / "other.pt"
    torch.save({"g_ema": {}, "thing": CreatesAFile(tmp_path / "created")}, path)
    assert_user_error(capsys, convert.main([str(path), str(tmp_path / "o.pt")]), "refused")
    assert not (tmp_path / "created").exists()


def test_unreadable_inputs_are_one_line(tmp_path, capsys):
    text = tmp_path / "notes.pkl"
    text.write_text("hello")
    assert_user_error(capsys, convert.main([str(text), str(tmp_path / "o.pt")]), "neither a network pickle")
    cut = tmp_path / "cut.pkl"
    cut.write_bytes(NVLABS.read_bytes()[:5000])
    assert_user_error(capsys, convert.main([str(cut), str(tmp_path / "o.pt")]), "not a readable network pickle")
    assert_user_error(capsys, convert.main([str(tmp_path / "none.pkl"), str(tmp_path / "o.pt")]), "not found")
    out = tmp_path / "exists.pt"
    out.write_bytes(b"mine")
    assert_user_error(capsys, convert.main([str(NVLABS), str(out)]), "exists", "--overwrite")
    assert out.read_bytes() == b"mine"


class Rewrite:
    """NVlabs' pickle format written from PersistentRecords, through a stand-in for NVlabs'
    torch_utils.persistence (registered only while writing): a way to make pickles of other shapes."""

    def __init__(self, monkeypatch):
        module = types.ModuleType("torch_utils.persistence")

        def _reconstruct_persistent_obj(meta):
            raise AssertionError("never called here")

        _reconstruct_persistent_obj.__module__ = module.__name__
        _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
        module._reconstruct_persistent_obj = _reconstruct_persistent_obj
        monkeypatch.setitem(sys.modules, "torch_utils", types.ModuleType("torch_utils"))
        monkeypatch.setitem(sys.modules, "torch_utils.persistence", module)
        self.reconstruct = _reconstruct_persistent_obj

    def wrap(self, value):
        if isinstance(value, pretrained.PersistentRecord):
            state = {k: self.wrap(v) for k, v in value.state.items()}
            meta = dict(type="class", version=6, module_src="", class_name=value.class_name, state=state)
            return _Reduced(self.reconstruct, meta)
        if isinstance(value, dict):
            return type(value)((k, self.wrap(v)) for k, v in value.items())
        return value

    def write(self, top, path):
        path.write_bytes(pickle.dumps({k: self.wrap(v) for k, v in top.items() if k in ("G", "D", "G_ema")}))
        return path


class _Reduced:
    def __init__(self, fn, meta):
        self.fn, self.meta = fn, meta

    def __reduce__(self):
        return (self.fn, (self.meta,))


def test_a_rewritten_pickle_still_converts(tmp_path, monkeypatch):
    top = pretrained.read_network_pickle(NVLABS)
    path = Rewrite(monkeypatch).write(top, tmp_path / "same.pkl")
    monkeypatch.undo()
    ref = reference("nvlabs_tiny")
    _, G, _ = converted(tmp_path, path, "--channels", "keep")
    with torch.no_grad():
        assert (G(ref["z"], noise_mode="const") - ref["G_ema_img"]).abs().max() < GREY_LEVEL / 2


@pytest.mark.parametrize("change, needle", [
    ("missing", "no tensor synthesis.b16.conv0.noise_const"),
    ("extra", "tensor synthesis.b8.input.freqs has no counterpart"),
    ("embedding", "label embedding has 8 features"),
    ("architecture", "'resnet' architecture"),
    ("shape", "tensor b4.out.weight has shape [2, 16]"),
    ("stylegan3", "tensor synthesis.freqs has no counterpart"),
    ("conditional", "tensor mapping.embed.weight has no counterpart"),
])
def test_networks_that_do_not_map_are_refused_naming_the_tensor(tmp_path, monkeypatch, capsys, change, needle):
    top = pretrained.read_network_pickle(NVLABS)
    G, D = top["G_ema"], top["D"]
    if change == "missing":
        del G.child("synthesis.b16.conv0").state["_buffers"]["noise_const"]
    elif change == "extra":  # StyleGAN3's alias-free generator starts from a Fourier-feature input layer
        freqs = pretrained.PersistentRecord(dict(class_name="SynthesisInput", state={
            "_parameters": {}, "_buffers": {"freqs": torch.zeros(16, 2)}, "_modules": {}}))
        G.child("synthesis.b8").state["_modules"]["input"] = freqs
    elif change == "embedding":
        fc0 = G.child("mapping.fc0").state["_parameters"]
        fc0["weight"] = torch.randn(16, 24)
        G.child("mapping").state["_modules"]["embed"] = pretrained.PersistentRecord(dict(class_name="FC", state={
            "_parameters": {"weight": torch.randn(8, 2), "bias": torch.zeros(8)}, "_buffers": {}, "_modules": {}}))
    elif change == "architecture":
        G.child("synthesis.b16").state["architecture"] = "resnet"
    elif change == "shape":  # a conditional D's output is a vector projected on the label's embedding
        D.child("b4.out").state["_parameters"]["weight"] = torch.randn(2, 16)
    elif change == "stylegan3":  # alias-free layers in place of the synthesis blocks
        G.state["_modules"]["synthesis"] = layer({"freqs": torch.zeros(16, 2)}, input=layer({"freqs": torch.zeros(8)}),
                                                 L0_36_16=layer({"weight": torch.zeros(16, 16, 3, 3)}))
    elif change == "conditional":  # NVlabs' conditional D has a mapping network for its labels
        D.state["_modules"]["mapping"] = layer({}, embed=layer({"weight": torch.zeros(16, 2)}))
    path = Rewrite(monkeypatch).write(top, tmp_path / "changed.pkl")
    monkeypatch.undo()
    capsys.readouterr()
    assert_user_error(capsys, convert.main([str(path), str(tmp_path / "o.pt")]), needle)


def layer(tensors, **modules):
    """A PersistentRecord of a module holding `tensors` and sub-modules."""
    return pretrained.PersistentRecord(dict(class_name="Layer", state={"_parameters": {}, "_buffers": dict(tensors),
                                                                       "_modules": modules}))


def test_a_tensorflow_pickle_is_refused_by_name(tmp_path, capsys):
    path = tmp_path / "stylegan2-ffhq-config-f.pkl"
    path.write_bytes(b"\x80\x02cdnnlib.tflib.network\nNetwork\n)\x81.")
    assert_user_error(capsys, convert.main([str(path), str(tmp_path / "o.pt")]), "TensorFlow", "nothing in it was run")


def test_rosinality_with_only_g_ema_converts_with_its_latent_avg(tmp_path):
    with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = torch.load(ROSINALITY, weights_only=True)
    latent_avg = torch.randn(16)
    path = tmp_path / "from_tf.pt"
    torch.save({"g_ema": ckpt["g_ema"], "latent_avg": latent_avg}, path)
    state, G, _ = converted(tmp_path, path)
    assert "D" not in state and torch.equal(state["G"]["synthesis.const"], state["G_ema"]["synthesis.const"])
    assert torch.equal(G.mapping.w_avg[0], latent_avg)


# ---------------------------------------------------------------------------------------
# Fine-tuning: train.py --init-from, --freeze-d
# ---------------------------------------------------------------------------------------
def test_init_from_starts_a_run_from_the_networks(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(smoke(data, out, "--init-from", str(NVLABS), "--max-steps", "3", "--eval-every", "0")) == 0
    assert "initialising from" in capsys.readouterr().out
    state, _ = checkpoints.load_checkpoint(out / "Models")
    source, _ = pretrained.load_pretrained(NVLABS)
    assert state["step"] == 3 and state["config"]["resample"] == "upfirdn"
    assert state["model_args"] == source["model_args"]
    for net in ("G", "D"):  # trained from the source's weights, not far from them after 3 steps
        moved = [(state[net][k] - v).abs().max().item() for k, v in source[net].items()]
        assert 0 < max(moved) < 0.1
    assert len(state["opt_G"]["state"]) > 0 and state["nimg"] == 24  # fresh optimisers, kimg from 0


def test_init_from_refuses_contradicting_flags_and_resume(data, tmp_path, capsys):
    code = train.main(smoke(data, tmp_path / "a", "--init-from", str(NVLABS), "--z-dim", "8"))
    assert_user_error(capsys, code, "--z-dim is 8", "drop it")
    code = train.main(smoke(data, tmp_path / "a", "--init-from", str(NVLABS), "--resolution", "64"))
    assert_user_error(capsys, code, "--resolution 64", "needs --progressive")  # growing it: see test_progressive
    code = train.main(smoke(data, tmp_path / "b", "--init-from", str(ROSINALITY), "--image-mode", "RGB",
                            "--max-steps", "1", "--eval-every", "0"))
    assert code == 0  # an RGB network keeps its channels for RGB data
    assert checkpoints.load_checkpoint(tmp_path / "b" / "Models")[0]["model_args"]["G"]["img_channels"] == 3
    capsys.readouterr()
    gray = tmp_path / "gray.pt"
    assert convert.main([str(NVLABS), str(gray)]) == 0
    code = train.main(smoke(data, tmp_path / "c", "--init-from", str(gray), "--image-mode", "RGB"))
    assert_user_error(capsys, code, "--image-mode RGB", "1 channel")
    assert train.main(smoke(data, tmp_path / "d", "--max-steps", "1")) == 0
    code = train.main(smoke(data, tmp_path / "d", "--resume", "--init-from", str(NVLABS)))
    assert_user_error(capsys, code, "--init-from", "--resume")


def test_init_from_a_checkpoint_of_this_toolkit(uncond_run, tmp_path):
    source, _ = checkpoints.load_checkpoint(uncond_run / "Models")
    cfg, _, init = train.settings({"INIT_FROM": str(uncond_run), "DATA_ROOT": "x"},  # a run folder: its Models/
                                  types.SimpleNamespace(preset="smoke"), tmp_path)
    assert cfg.z_dim == source["config"]["z_dim"] and torch.equal(init["G_ema"]["synthesis.const"],
                                                                  source["G_ema"]["synthesis.const"])


def initialised_run(source, tmp_path, *flags):
    """The run --init-from `source` with (setting, value) `flags` starts from, before its first step."""
    given = dict({"INIT_FROM": str(source), "DATA_ROOT": "x"}, **dict(flags))
    cfg, _, init = train.settings(given, types.SimpleNamespace(preset="smoke"), tmp_path)
    data = types.SimpleNamespace(class_names=["AD", "NC"], channels=1)
    run = training.build_run(cfg, data, torch.device("cpu"))
    training.initialise(run, init, data, cfg.init_from)
    return run


def test_init_from_adds_scanner_noise_to_a_network_and_drops_it(data, uncond_run, tmp_path):
    source, _ = checkpoints.load_checkpoint(uncond_run / "Models")
    noisy = initialised_run(uncond_run, tmp_path, ("SCANNER_NOISE", True))
    assert noisy.model_args["G"]["scanner_noise"] and "scanner_noise" not in source["model_args"]["G"]
    for name in ("G", "G_ema"):  # the source's layers as they were
        state = getattr(noisy, name).state_dict()
        assert all(torch.equal(state[k], v) for k, v in source[name].items()), name
    out = tmp_path / "noisy"  # trained on: the noise levels are the training slices'
    assert train.main(smoke(data, out, "--init-from", str(uncond_run), "--scanner-noise", "--max-steps", "2",
                            "--eval-every", "0")) == 0
    trained, _ = checkpoints.load_checkpoint(out / "Models")
    images = dataset.load_slices(settings.checkpoint_settings(trained)).images
    measured = modules.ScannerNoise(32, 1).measure(images)
    assert measured.min() > 0
    for name in ("G", "G_ema"):
        assert torch.equal(trained[name]["synthesis.scanner_noise.levels"], measured), name
    training.measure_scanner_noise(noisy, types.SimpleNamespace(images=images))  # both, before any EMA step
    assert all(torch.equal(net.synthesis.scanner_noise.levels, measured) for net in (noisy.G, noisy.G_ema))
    assert initialised_run(out, tmp_path).G_ema.synthesis.scanner_noise is not None  # not given: the network's
    plain = initialised_run(out, tmp_path, ("SCANNER_NOISE", False))
    assert "scanner_noise" not in plain.model_args["G"] and plain.G_ema.synthesis.scanner_noise is None
    assert all(torch.equal(v, trained["G_ema"][k]) for k, v in plain.G_ema.state_dict().items())


def test_freeze_d_keeps_the_highest_resolution_blocks_fixed():
    cfg = settings.resolve_settings({"FREEZE_D": 2, "LOSS": "logistic", "R1_GAMMA": 1.0}, "", "smoke")
    torch.manual_seed(0)
    run = training.build_run(cfg, types.SimpleNamespace(class_names=["AD", "NC"], channels=1), torch.device("cpu"))
    frozen = {id(p) for p in training.frozen_d_parameters(run.D, 2)}
    before = {n: p.detach().clone() for n, p in run.D.named_parameters()}
    data = types.SimpleNamespace(images=torch.randint(0, 255, (8, 1, 32, 32), dtype=torch.uint8),
                                 labels=torch.zeros(8, dtype=torch.long))
    for _ in range(2):
        training.train_step(run, cfg, data, torch.arange(8))
    for name, p in run.D.named_parameters():
        fixed = id(p) in frozen
        assert fixed == name.startswith(("from_img", "blocks.0.", "blocks.1.")), name
        assert torch.equal(p, before[name]) == fixed, name
        assert p.requires_grad != fixed, name


def test_freeze_d_beyond_the_blocks_is_one_line(data, tmp_path, capsys):
    code = train.main(smoke(data, tmp_path, "--freeze-d", "4"))
    assert_user_error(capsys, code, "--freeze-d 4", "3 blocks")


def test_freeze_d_cannot_change_on_resume(data, tmp_path, capsys):
    assert train.main(smoke(data, tmp_path, "--max-steps", "1", "--freeze-d", "1")) == 0
    code = train.main(smoke(data, tmp_path, "--resume", "--freeze-d", "0"))
    assert_user_error(capsys, code, "--freeze-d is 0", "trained with 1")


@torch.no_grad()
def test_conv_clamp_limits_every_activated_output():
    import modules
    torch.manual_seed(0)
    G = modules.Generator(16, 16, 2, 32, 1, channel_base=256, channel_max=16, conv_clamp=0.25)
    D = modules.Discriminator(32, 1, channel_base=256, channel_max=16, conv_clamp=0.25)
    seen = []
    for m in [*G.modules(), *D.modules()]:
        if isinstance(m, (modules.StyledLayer, modules.ToImage)) or (isinstance(m, modules.EqualConv2d)
                                                                      and m.activation):
            m.register_forward_hook(lambda mod, args, out: seen.append(out.abs().max().item()))
    D(G(torch.randn(4, 16)) * 10)
    assert len(seen) == 2 + 3 * 3 + 1 + 3 * 2 + 1 and max(seen) == 0.25  # each layer of G and D, clamped


def test_evaluate_and_generate_take_a_converted_checkpoint(data, tmp_path, capsys):
    import evaluate
    out = tmp_path / "Models" / "nvlabs.pt"
    assert convert.main([str(NVLABS), str(out)]) == 0
    assert evaluate.main(["--checkpoint", str(out), "--data-root", str(data), "--n", "16",
                          "--out", str(tmp_path / "eval.json")]) == 0
    assert generate_images.main(["--checkpoint", str(out), "--n", "4", "--out-dir", str(tmp_path / "gen")]) == 0
    assert len(list((tmp_path / "gen").glob("seed*.png"))) == 4


@pytest.mark.parametrize("argv, needle", [([], "IN, OUT"), (["a.pkl"], "OUT"), (["--channels", "rgb", "a", "b"],
                                                                               "--channels")])
def test_convert_bad_command_lines_are_one_line(capsys, argv, needle):
    assert_user_error(capsys, convert.main(argv), needle)
