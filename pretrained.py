"""Networks trained elsewhere, as checkpoints of this toolkit: NVlabs' StyleGAN2-ADA pickles, read by
a restricted unpickler that runs nothing in them (the source code they embed is never executed or
imported), and rosinality's stylegan2-pytorch checkpoints, read with torch.load(weights_only=True).
Their weights are mapped onto modules.py's networks, whose `upfirdn` resampling and output clamp
compute what the originals compute; RGB networks can be made grayscale. convert.py and
train.py --init-from use it."""
import argparse
import collections
import io
import math
import pickle
import warnings
from pathlib import Path

import numpy as np
import torch

import constants
from checkpoints import check_checkpoint, file_format, load_checkpoint, make_checkpoint, read_checkpoint
from modules import Discriminator, Generator
from settings import ARCHITECTURE, UserError, checkpoint_settings, flag_of, model_args_of, resolve_settings

LUMA = (0.299, 0.587, 0.114)  # RGB -> gray weights of ITU-R BT.601, as PIL's convert("L") that loads the data
W_AVG_SAMPLES = 10_000  # rosinality checkpoints keep no mean w: it is estimated from this many seeded z


# ---------------------------------------------------------------------------------------
# Reading NVlabs pickles: an allow-list of what network state needs, read as data
# ---------------------------------------------------------------------------------------
class PersistentRecord:
    """An NVlabs persistent object (torch_utils.persistence) as data: its class name and its state
    (the module's __dict__). The module source stored beside them is dropped, never run."""

    def __init__(self, meta):
        if not isinstance(meta, dict) or not isinstance(meta.get("state"), dict):
            raise pickle.UnpicklingError("a persistent object without a state")
        self.class_name = str(meta.get("class_name", "?"))
        self.state = meta["state"]

    def attr(self, name, default=None):
        return self.state.get(name, default)

    def child(self, path):
        """The sub-record at dotted `path` (None when there is none)."""
        record = self
        for part in path.split(".") if path else []:
            record = (record.state.get("_modules") or {}).get(part)
            if not isinstance(record, PersistentRecord):
                return None
        return record

    def tensors(self, prefix=""):
        """{dotted name: tensor} of its parameters and buffers and those of its sub-modules."""
        out = {}
        for group in ("_parameters", "_buffers"):
            out.update({prefix + k: v for k, v in (self.state.get(group) or {}).items() if v is not None})
        for name, sub in (self.state.get("_modules") or {}).items():
            if isinstance(sub, PersistentRecord):
                out.update(sub.tensors(f"{prefix}{name}."))
        return out


class _EasyDict(dict):
    """dnnlib.util.EasyDict read as a plain dictionary."""


def _rebuild_tensor(storage, offset, size, stride, *_):
    """torch._utils._rebuild_tensor_v2 without its hooks and metadata: a tensor over `storage`."""
    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError("a tensor without a storage")
    return torch.empty(0, dtype=storage.dtype).set_(storage._untyped_storage, offset, size, stride)


def _rebuild_parameter(data, *_):
    """A parameter as a plain tensor (its requires_grad flag and hooks are not needed)."""
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("a parameter without a tensor")
    return data


class Refused(pickle.UnpicklingError):
    """Something in a network pickle that would run code if it were loaded."""


def _storage_from_bytes(data):
    """torch.storage._load_from_bytes, but with weights_only=True: a tensor storage and nothing else."""
    if not isinstance(data, bytes):
        raise pickle.UnpicklingError("a storage that is not bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            storage = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():
            raise Refused("a tensor storage that holds Python objects other than tensors") from None
        raise
    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError("a storage record that holds something else")
    return storage


def _numpy_dtype(spec, align=False, copy=False):
    """numpy.dtype of a plain number type (no object or structured types)."""
    dtype = np.dtype(spec) if isinstance(spec, str) else None
    if dtype is None or dtype.kind not in "biufc":
        raise pickle.UnpicklingError(f"a numpy type other than a number ({spec!r})")
    return np.dtype(spec, align, copy)


def _numpy_scalar(dtype, data):
    """A numpy scalar (such as a layer's weight gain) as a Python number."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biufc" or not isinstance(data, bytes):
        raise pickle.UnpicklingError("a numpy scalar that is not a number")
    return np.frombuffer(data, dtype, count=1)[0].item()


ALLOWED = {  # (module, name) in the pickle -> what builds it here
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): PersistentRecord,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    ("numpy", "dtype"): _numpy_dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
}


class NetworkUnpickler(pickle.Unpickler):
    """Unpickles only ALLOWED names; anything else (a class, a function, a module) refuses the file."""

    def __init__(self, file, path):
        super().__init__(file)
        self.path = path

    def find_class(self, module, name):
        if (module, name) in ALLOWED:
            return ALLOWED[module, name]
        if module.startswith("dnnlib.tflib"):
            raise UserError(f"{self.path} is a TensorFlow StyleGAN pickle ({module}.{name}), which this toolkit "
                            "does not read: refused (nothing in it was run)")
        raise UserError(f"{self.path} holds {module}.{name}, which a network pickle does not need: refused "
                        "for safety (nothing in it was run)")

    def persistent_load(self, pid):
        raise UserError(f"{self.path} refers to outside objects, which a network pickle does not need: refused "
                        "for safety (nothing in it was run)")


def read_network_pickle(path):
    """The top-level object of an NVlabs network pickle, with its networks as PersistentRecords."""
    try:
        with open(path, "rb") as f:
            return NetworkUnpickler(f, path).load()
    except UserError:
        raise
    except Refused as e:
        raise UserError(f"{path} holds {e}: refused for safety (nothing in it was run)") from None
    except Exception as e:  # noqa: BLE001 - a damaged or foreign pickle: one line, whatever the cause
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a readable network pickle ({reason})") from None


# ---------------------------------------------------------------------------------------
# Tensor maps: source names -> this toolkit's names, checked both ways
# ---------------------------------------------------------------------------------------
def map_tensors(source, names, target, what):
    """{our name: tensor} for `target`'s state dict, from `source` {their name: tensor} through
    `names` {our name: (their name, transform or None)}. Refused, naming the tensor, when one is
    missing, has the wrong shape, or is left over."""
    out = {}
    for ours, (theirs, transform) in names.items():
        if theirs not in source:
            raise UserError(f"{what}: no tensor {theirs}, which this toolkit's network needs (for {ours})")
        t = source[theirs].detach().float()
        t = transform(t) if transform is not None else t
        if t.shape != target[ours].shape:
            raise UserError(f"{what}: tensor {theirs} has shape {list(source[theirs].shape)}, where this toolkit's "
                            f"network needs {list(target[ours].shape)} (for {ours})")
        out[ours] = t.clone()
    used = {theirs for theirs, _ in names.values()}
    extra = [n for n in source if n not in used]
    if extra:
        raise UserError(f"{what}: tensor {extra[0]} has no counterpart in this toolkit's networks "
                        f"({len(extra)} such tensor{'s' if len(extra) > 1 else ''})")
    return out


def infer_channels(channels, what):
    """(channel_base, channel_max) with min(base // r, max) = channels[r] for every resolution r."""
    cmax = max(channels.values())
    below = [r for r in sorted(channels) if channels[r] < cmax]
    base = channels[below[0]] * below[0] if below else cmax * max(channels)
    if any(min(base // r, cmax) != c for r, c in channels.items()):
        widths = ", ".join(f"{r}: {c}" for r, c in sorted(channels.items()))
        raise UserError(f"{what}: its channel widths ({widths}) do not follow this toolkit's "
                        "min(CHANNEL_BASE // resolution, CHANNEL_MAX)")
    return base, cmax


def resolutions_of(resolution):
    return [2**i for i in range(3, int(math.log2(resolution)) + 1)]


def layer_names(ours, theirs, noise_const=None):
    """The names of our StyledLayer (with `noise_const`) or ToImage (without) `ours`: `theirs` maps
    the suffixes weight, affine.weight, affine.bias, bias (and strength) to (source name, transform)."""
    names = {f"{ours}.conv.weight": theirs["weight"], f"{ours}.conv.affine.weight": theirs["affine.weight"],
             f"{ours}.conv.affine.bias": theirs["affine.bias"], f"{ours}.bias": theirs["bias"]}
    if noise_const is not None:
        names.update({f"{ours}.noise.strength": theirs["strength"], f"{ours}.noise.const_noise": noise_const})
    return names


# ---------------------------------------------------------------------------------------
# NVlabs StyleGAN2-ADA (stylegan2-ada-pytorch, and the pickles of stylegan3's StyleGAN2 configs)
# ---------------------------------------------------------------------------------------
FILTER = (lambda k: torch.outer(k, k) / torch.outer(k, k).sum())(torch.tensor([1.0, 3.0, 3.0, 1.0]))


def drop_filters(tensors, suffix, what):
    """The source's tensors without its resampling filters (names ending `suffix`; this toolkit's
    filter is fixed), refusing a filter other than [1, 3, 3, 1] (at any gain)."""
    tensors = dict(tensors)
    for name in [n for n in tensors if n.endswith(suffix)]:
        f = tensors.pop(name).float()
        if f.shape != FILTER.shape or not torch.allclose(f / f.sum(), FILTER):
            raise UserError(f"{what}: {name} is not the [1, 3, 3, 1] filter this toolkit uses")
    return tensors


def _nvlabs_layer(prefix):
    names = {k: (f"{prefix}.{k}", None) for k in ("weight", "affine.weight", "affine.bias", "bias")}
    return dict(names, strength=(f"{prefix}.noise_strength", None))


def nvlabs_generator_names(arch):
    """{our G tensor: (NVlabs tensor, transform)}."""
    const = lambda t: t[None, None]  # noqa: E731  (R, R) -> (1, 1, R, R)
    classes = max(arch["num_classes"], 1)  # NVlabs keeps one mean w; this toolkit one per class
    names = {"synthesis.const": ("synthesis.b4.const", None),
             "mapping.w_avg": ("mapping.w_avg", lambda t: t[None].expand(classes, -1))}
    for i in range(arch["MAPPING_LAYERS"]):
        names.update({f"mapping.layers.{i}.{k}": (f"mapping.fc{i}.{k}", None) for k in ("weight", "bias")})
    if arch["CONDITIONAL"]:
        names.update({f"mapping.embed.{k}": (f"mapping.embed.{k}", None) for k in ("weight", "bias")})
    layers = [("synthesis.conv", "synthesis.b4.conv1"), ("synthesis.to_img", "synthesis.b4.torgb")]
    for i, r in enumerate(resolutions_of(arch["RESOLUTION"])):
        layers += [(f"synthesis.blocks.{i}.conv0", f"synthesis.b{r}.conv0"),
                   (f"synthesis.blocks.{i}.conv1", f"synthesis.b{r}.conv1"),
                   (f"synthesis.blocks.{i}.to_img", f"synthesis.b{r}.torgb")]
    for ours, theirs in layers:
        noise = None if ours.endswith("to_img") else (f"{theirs}.noise_const", const)
        names.update(layer_names(ours, _nvlabs_layer(theirs), noise))
    return names


def nvlabs_discriminator_names(arch):
    res = arch["RESOLUTION"]
    names = {f"from_img.{k}": (f"b{res}.fromrgb.{k}", None) for k in ("weight", "bias")}
    for i, r in enumerate(reversed(resolutions_of(res))):
        for ours, theirs in (("conv0", "conv0"), ("conv1", "conv1")):
            names.update({f"blocks.{i}.{ours}.{k}": (f"b{r}.{theirs}.{k}", None) for k in ("weight", "bias")})
        names[f"blocks.{i}.skip.weight"] = (f"b{r}.skip.weight", None)
    for layer in ("conv", "fc", "out"):
        names.update({f"{layer}.{k}": (f"b4.{layer}.{k}", None) for k in ("weight", "bias")})
    return names


def _need(record, path, what, tensor=None):
    """A sub-record (or one of its tensors) that the architecture must have, else a one-line refusal."""
    sub = record.child(path)
    name = f"{path}.{tensor}" if tensor else path
    if sub is None or (tensor and tensor not in sub.tensors()):
        raise UserError(f"{what}: no {'tensor' if tensor else 'layer'} {name}, which this toolkit's network needs")
    return sub


def nvlabs_generator_arch(G, what):
    """This toolkit's architecture settings for an NVlabs Generator record."""
    if G.child("synthesis.b4") is None:  # StyleGAN3's alias-free synthesis, say: refused by its first tensor
        first = next(iter(G.tensors("")), "?") if G.child("synthesis") is None else \
            next(iter(G.child("synthesis").tensors("synthesis.")), "?")
        raise UserError(f"{what}: tensor {first} has no counterpart in this toolkit's networks (no synthesis.b4: "
                        "not a StyleGAN2 generator)")
    n = 0
    while G.child(f"mapping.fc{n}") is not None:
        n += 1
    fc0 = _need(G, "mapping.fc0", what, "weight")
    w_dim = _need(G, f"mapping.fc{n - 1}", what, "weight").tensors()["weight"].shape[0]
    embed = G.child("mapping.embed")
    embed_dim = embed.tensors()["weight"].shape[0] if embed is not None else 0
    z_dim = fc0.tensors()["weight"].shape[1] - embed_dim
    if embed is not None and embed_dim != z_dim:
        raise UserError(f"{what}: its label embedding has {embed_dim} features, where this toolkit's embeds "
                        f"labels into z's {z_dim}: tensor mapping.embed.weight does not map")
    res = 4
    while G.child(f"synthesis.b{res * 2}") is not None:
        res *= 2
    if res < 8:
        _need(G, "synthesis.b8", what)
    for r in [4] + resolutions_of(res):
        block = _need(G, f"synthesis.b{r}", what)
        if block.attr("architecture", "skip") != "skip":
            raise UserError(f"{what}: synthesis.b{r} is the {block.attr('architecture')!r} architecture; "
                            "this toolkit's generator is the 'skip' one")
    channels = {r: _need(G, f"synthesis.b{r}.conv1", what, "weight").tensors()["weight"].shape[0]
                for r in [4] + resolutions_of(res)}
    base, cmax = infer_channels(channels, what)
    clamp = G.child(f"synthesis.b{res}.conv1").attr("conv_clamp")
    img_channels = _need(G, f"synthesis.b{res}.torgb", what, "weight").tensors()["weight"].shape[0]
    return dict(RESOLUTION=res, Z_DIM=z_dim, W_DIM=w_dim, MAPPING_LAYERS=n, CONDITIONAL=embed is not None,
                MAPPING_LR_MULT=float(fc0.attr("bias_gain", 0.01)),
                W_AVG_BETA=float(G.child("mapping").attr("w_avg_beta", 0.995) or 0.995),
                CHANNEL_BASE=base, CHANNEL_MAX=cmax, RESAMPLE="upfirdn", CONV_CLAMP=float(clamp or 0),
                img_channels=img_channels, num_classes=embed.tensors()["weight"].shape[1] if embed is not None else 0)


def nvlabs_discriminator_check(D, arch, what):
    """Refuse an NVlabs Discriminator record whose shape this toolkit's D (with `arch`) cannot take."""
    res = arch["RESOLUTION"]
    if D.child("mapping") is not None:
        first = next(iter(D.child("mapping").tensors("mapping.")), "mapping")
        raise UserError(f"{what}: tensor {first} has no counterpart in this toolkit's networks (a conditional "
                        "NVlabs discriminator maps labels with a network of its own; this toolkit's projects them)")
    for r in resolutions_of(res):
        block = _need(D, f"b{r}", what)
        if block.attr("architecture", "resnet") != "resnet":
            raise UserError(f"{what}: b{r} is the {block.attr('architecture')!r} architecture; "
                            "this toolkit's discriminator is the 'resnet' one")
    mbstd = _need(D, "b4.mbstd", what)
    group, features = mbstd.attr("group_size"), mbstd.attr("num_channels", 1)
    if features != 1 or not group:
        raise UserError(f"{what}: its minibatch standard deviation takes {features} feature(s) over groups of "
                        f"{group or 'the whole batch'}; this toolkit's takes one over a fixed group size")
    channels = {r: _need(D, f"b{r}.conv0", what, "weight").tensors()["weight"].shape[0] for r in resolutions_of(res)}
    channels[4] = _need(D, "b4.conv", what, "weight").tensors()["weight"].shape[0]
    if infer_channels(channels, what) != (arch["CHANNEL_BASE"], arch["CHANNEL_MAX"]):
        raise UserError(f"{what}: D's channel widths differ from G's; this toolkit's settings give both the same")
    clamp = float(_need(D, f"b{res}.conv0", what).attr("conv_clamp") or 0)
    if clamp != arch["CONV_CLAMP"]:
        raise UserError(f"{what}: D clamps at {clamp:g} and G at {arch['CONV_CLAMP']:g}; this toolkit uses one clamp")
    return int(group)


def import_nvlabs(path, top):
    """(architecture settings, {G, G_ema, D: our state dicts}) of an NVlabs network pickle."""
    if not isinstance(top, dict) or not isinstance(top.get("G_ema"), PersistentRecord):
        held = ", ".join(map(str, list(top)[:6])) if isinstance(top, dict) else type(top).__name__
        raise UserError(f"{path} is not an NVlabs network pickle with G_ema (it holds: {held or 'nothing'})")
    arch = nvlabs_generator_arch(top["G_ema"], f"{path} G_ema")
    states = {}
    for name in ("G_ema", "G", "D"):
        record = top.get(name)
        if not isinstance(record, PersistentRecord):
            continue
        what = f"{path} {name}"
        if name == "D":
            arch["MBSTD_GROUP"] = nvlabs_discriminator_check(record, arch, what)
        names = nvlabs_discriminator_names(arch) if name == "D" else nvlabs_generator_names(arch)
        states[name] = (drop_filters(record.tensors(), "resample_filter", what), names, what)
    return arch, states


# ---------------------------------------------------------------------------------------
# rosinality stylegan2-pytorch
# ---------------------------------------------------------------------------------------
def _rosinality_layer(prefix, image=False):
    first = lambda t: t[0]  # noqa: E731  (1, O, I, k, k) -> (O, I, k, k)
    names = {"weight": (f"{prefix}.conv.weight", first), "affine.weight": (f"{prefix}.conv.modulation.weight", None),
             "affine.bias": (f"{prefix}.conv.modulation.bias", None)}
    if image:
        names["bias"] = (f"{prefix}.bias", lambda t: t.flatten())  # (1, C, 1, 1) -> (C,)
    else:
        names.update(bias=(f"{prefix}.activate.bias", None),
                     strength=(f"{prefix}.noise.weight", lambda t: t.reshape([])))  # (1,) -> ()
    return names


def rosinality_generator_names(arch):
    names = {"synthesis.const": ("input.input", lambda t: t[0])}
    for i in range(arch["MAPPING_LAYERS"]):
        names.update({f"mapping.layers.{i}.{k}": (f"style.{i + 1}.{k}", None) for k in ("weight", "bias")})
    layers = [("synthesis.conv", "conv1", 0), ("synthesis.to_img", "to_rgb1", None)]
    for i, _ in enumerate(resolutions_of(arch["RESOLUTION"])):
        layers += [(f"synthesis.blocks.{i}.conv0", f"convs.{2 * i}", 2 * i + 1),
                   (f"synthesis.blocks.{i}.conv1", f"convs.{2 * i + 1}", 2 * i + 2),
                   (f"synthesis.blocks.{i}.to_img", f"to_rgbs.{i}", None)]
    for ours, theirs, noise in layers:
        const = None if noise is None else (f"noises.noise_{noise}", None)
        names.update(layer_names(ours, _rosinality_layer(theirs, image=noise is None), const))
    return names


def rosinality_discriminator_names(arch):
    names = {"from_img.weight": ("convs.0.0.weight", None), "from_img.bias": ("convs.0.1.bias", None)}
    for i, _ in enumerate(resolutions_of(arch["RESOLUTION"])):
        block = f"convs.{i + 1}"
        names.update({f"blocks.{i}.conv0.weight": (f"{block}.conv1.0.weight", None),
                      f"blocks.{i}.conv0.bias": (f"{block}.conv1.1.bias", None),
                      f"blocks.{i}.conv1.weight": (f"{block}.conv2.1.weight", None),
                      f"blocks.{i}.conv1.bias": (f"{block}.conv2.2.bias", None),
                      f"blocks.{i}.skip.weight": (f"{block}.skip.1.weight", None)})
    names.update({"conv.weight": ("final_conv.0.weight", None), "conv.bias": ("final_conv.1.bias", None),
                  "fc.weight": ("final_linear.0.weight", None), "fc.bias": ("final_linear.0.bias", None),
                  "out.weight": ("final_linear.1.weight", None), "out.bias": ("final_linear.1.bias", None)})
    return names


def rosinality_arch(g, what):
    if "style.1.weight" not in g:
        raise UserError(f"{what}: no tensor style.1.weight, which this toolkit's network needs")
    n = 0
    while f"style.{n + 1}.weight" in g:
        n += 1
    w_dim = g["style.1.weight"].shape[0]
    blocks = 0
    while f"to_rgbs.{blocks}.conv.weight" in g:
        blocks += 1
    res = 4 * 2**blocks
    if blocks == 0 or "conv1.conv.weight" not in g:
        missing = "to_rgbs.0.conv.weight" if blocks == 0 else "conv1.conv.weight"
        raise UserError(f"{what}: no tensor {missing}, which this toolkit's network needs")
    channels = {4: g["conv1.conv.weight"].shape[1]}
    channels.update({r: g[f"convs.{2 * i}.conv.weight"].shape[1] for i, r in enumerate(resolutions_of(res))
                     if f"convs.{2 * i}.conv.weight" in g})
    base, cmax = infer_channels(channels, what)
    return dict(RESOLUTION=res, Z_DIM=w_dim, W_DIM=w_dim, MAPPING_LAYERS=n, CONDITIONAL=False, MAPPING_LR_MULT=0.01,
                W_AVG_BETA=constants.W_AVG_BETA, CHANNEL_BASE=base, CHANNEL_MAX=cmax, RESAMPLE="upfirdn",
                CONV_CLAMP=0.0, MBSTD_GROUP=4, img_channels=g["to_rgb1.conv.weight"].shape[1], num_classes=0)


def import_rosinality(path, ckpt):
    """(architecture settings, states) of a rosinality checkpoint ({g, d, g_ema, ...} state dicts)."""
    g_ema = ckpt.get("g_ema")
    if not isinstance(g_ema, dict):
        raise UserError(f"{path} is a stylegan2-pytorch checkpoint without g_ema")
    arch = rosinality_arch(g_ema, f"{path} g_ema")
    states = {}
    for ours, theirs in (("G_ema", "g_ema"), ("G", "g"), ("D", "d")):
        if isinstance(ckpt.get(theirs), dict):
            what = f"{path} {theirs}"
            sd = drop_filters(ckpt[theirs], ".kernel", what)
            names = rosinality_discriminator_names(arch) if ours == "D" else rosinality_generator_names(arch)
            states[ours] = (sd, names, what)
    latent_avg = ckpt.get("latent_avg")
    arch["w_avg"] = latent_avg.float().flatten() if isinstance(latent_avg, torch.Tensor) else None
    return arch, states


def estimate_w_avg(G):
    """The mean w of W_AVG_SAMPLES seeded z, for truncation, where the source kept none."""
    z = torch.randn(W_AVG_SAMPLES, G.z_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return G.mapping(z).mean(0)


# ---------------------------------------------------------------------------------------
# Grayscale, and the checkpoint this toolkit writes
# ---------------------------------------------------------------------------------------
def to_gray(G_state, D_state):
    """An RGB network's state dicts made 1-channel: each image output becomes the luminance of its
    three (LUMA-weighted sum of their weights and biases), and D's from-image layer sums its three
    input channels' weights, so D scores a gray image as the RGB network scored it repeated to RGB."""
    luma = torch.tensor(LUMA)
    G_state = dict(G_state)
    for name in [n for n in G_state if n.endswith("to_img.conv.weight")]:
        w = G_state[name]  # (3, C, 1, 1)
        G_state[name] = torch.einsum("c,cikl->ikl", luma, w)[None]
        bias = name.replace("conv.weight", "bias")
        G_state[bias] = (luma @ G_state[bias])[None]
    if D_state is not None:
        D_state = dict(D_state)
        if "from_img.weight" not in D_state:
            raise UserError("--channels gray needs a discriminator without spectral normalisation")
        w = D_state["from_img.weight"]  # (C, 3, 1, 1); the equalised scale 1/sqrt(fan-in) drops from 1/sqrt(3) to 1
        D_state["from_img.weight"] = w.sum(1, keepdim=True) / math.sqrt(w.shape[1])
    return G_state, D_state


def detect_format(path):
    """folder (of checkpoints), pickle (NVlabs'), torch (a torch.save file: rosinality's or this
    toolkit's), or a refusal."""
    path = Path(path)
    if path.is_dir():
        return "folder"
    if not path.is_file():
        raise UserError(f"network file not found: {path}")
    return file_format(path, "is neither a network pickle nor a PyTorch checkpoint").replace("zip", "torch")


def read_source(path):
    """(format, architecture settings, states, source checkpoint of this toolkit or None) of a network
    file, or of the newest checkpoint in a folder (a run's folder: its Models/)."""
    kind = detect_format(path)
    if kind == "folder":
        models = Path(path) / "Models"
        return ("toolkit", None, None, load_checkpoint(models if models.is_dir() else path)[0])
    if kind == "pickle":
        top = read_network_pickle(path)
        if not isinstance(top, int):  # torch's legacy (non-zip) format starts with a magic number
            return ("nvlabs", *import_nvlabs(path, top), None)
    with torch.serialization.safe_globals([argparse.Namespace]):  # rosinality keeps its argparse options
        ckpt = read_checkpoint(path)
    if isinstance(ckpt, dict) and "G_ema" in ckpt and "model_args" in ckpt:
        return ("toolkit", None, None, check_checkpoint(ckpt, path))
    if isinstance(ckpt, dict) and ("g_ema" in ckpt or "g" in ckpt):
        return ("rosinality", *import_rosinality(path, ckpt), None)
    held = ", ".join(map(str, list(ckpt)[:6])) if isinstance(ckpt, dict) else type(ckpt).__name__
    raise UserError(f"{path} is neither a checkpoint of this toolkit nor a stylegan2-pytorch one (it holds: {held})")


def build_checkpoint(arch, states, fmt, path):
    """A checkpoint of this toolkit (step 0) from imported architecture settings and state dicts;
    without a source D it has none, and a G without its own copy is the G_ema."""
    arch = dict(arch)
    img_channels, num_classes, w_avg = arch.pop("img_channels"), arch.pop("num_classes"), arch.pop("w_avg", None)
    cfg = resolve_settings(dict(arch, IMAGE_MODE="L" if img_channels == 1 else "RGB"), "")
    cfg.preset = None
    model_args = model_args_of(cfg, img_channels, num_classes)
    weights = {}
    for name, (source, names, what) in states.items():
        net = Discriminator(**model_args["D"]) if name == "D" else Generator(**model_args["G"])
        target = net.state_dict()
        mapped = map_tensors(source, names, target, what)
        if name != "D" and "mapping.w_avg" not in mapped:  # rosinality keeps no mean w
            net.load_state_dict(mapped, strict=False)
            mean = w_avg if w_avg is not None else estimate_w_avg(net)
            mapped["mapping.w_avg"] = mean.reshape(1, -1).expand(target["mapping.w_avg"].shape).clone()
        net.load_state_dict(mapped)  # strict: every tensor of the network is in place
        weights[name] = net.state_dict()
    weights.setdefault("G", weights["G_ema"])
    history = {k: torch.zeros(0) for k in ("loss_gen", "loss_critic")}
    return make_checkpoint(cfg, model_args, [str(k) for k in range(num_classes)], weights, history,
                           source=dict(format=fmt, path=str(path)))


def gray_checkpoint(ckpt):
    """A 3-channel checkpoint made 1-channel (to_gray), its settings saying so; a 1-channel one as it is."""
    channels = ckpt["model_args"]["G"]["img_channels"]
    if channels == 1:
        return ckpt
    if channels != 3:
        raise UserError(f"--channels gray needs a 1- or 3-channel network; this one has {channels}")
    G, D = to_gray(ckpt["G"], ckpt.get("D"))
    G_ema, _ = to_gray(ckpt["G_ema"], None)
    model_args = {net: dict(args, img_channels=1) for net, args in ckpt["model_args"].items()}
    out = dict(ckpt, G=G, G_ema=G_ema, model_args=model_args, config=dict(ckpt["config"], image_mode="L"))
    if D is not None:
        out["D"] = D
    out["source"] = dict(ckpt.get("source", {}), channels="gray from RGB")
    return out


def load_pretrained(path, channels="gray"):
    """-> (checkpoint of this toolkit, format name): any network file this toolkit reads, converted,
    and made 1-channel when `channels` is gray."""
    fmt, arch, states, own = read_source(path)
    ckpt = own if own is not None else build_checkpoint(arch, states, fmt, path)
    return (gray_checkpoint(ckpt) if channels == "gray" else ckpt), fmt


def describe(ckpt):
    """One line on a checkpoint's networks: resolution, channels, z, w, mapping, widths, which networks."""
    g = ckpt["model_args"]["G"]
    nets = ", ".join(n for n in ("G_ema", "G", "D") if n in ckpt)
    return (f"{g['resolution']}x{g['resolution']}, {g['img_channels']} channel(s), z {g['z_dim']}, w {g['w_dim']}, "
            f"{g['mapping_layers']} mapping layers, channels {g['channel_base']}/{g['channel_max']}, "
            f"{g.get('num_classes', 0) or 'no'} classes, resample {g.get('resample', 'bilinear')}; {nets}")


def init_networks(cfg, given):
    """--init-from: the source network as a checkpoint of this toolkit (1-channel for gray data), its
    architecture settings set in `cfg`; a flag given that contradicts them is refused."""
    source, fmt = load_pretrained(cfg.init_from, "gray" if cfg.image_mode == "L" else "keep")
    channels = source["model_args"]["G"]["img_channels"]
    if channels != (1 if cfg.image_mode == "L" else 3):
        raise UserError(f"--image-mode {cfg.image_mode} needs a {'3' if cfg.image_mode == 'RGB' else '1'}-channel "
                        f"network, but --init-from {cfg.init_from} has {channels} channel(s)")
    arch = checkpoint_settings(source)
    grow = growing_from(cfg, given, arch.resolution)
    for name in ARCHITECTURE:
        theirs = getattr(arch, name.lower())
        if name == "IMAGE_MODE" or (grow and name in GROWN) or (name in UNTRAINED and name in given):
            continue  # the run's
        if name in given and given[name] != theirs:
            raise UserError(f"{flag_of(name)} is {given[name]!r} but --init-from {cfg.init_from} has {theirs!r}; "
                            "drop it (the architecture comes from the network)")
        setattr(cfg, name.lower(), theirs)
    print(f"initialising from {cfg.init_from} ({fmt}): {describe(source)}")
    if grow:
        cfg.progressive_start = arch.resolution
        cfg.progressive_hold_kimg = given.get("PROGRESSIVE_HOLD_KIMG", 0.0)
        print(f"growing it from {arch.resolution}x{arch.resolution} to {cfg.resolution}x{cfg.resolution}: "
              f"--progressive-start {arch.resolution}, --progressive-hold-kimg {cfg.progressive_hold_kimg:g}")
    return source


UNTRAINED = ("SCANNER_NOISE",)  # layers without trained weights: a run may add or drop them
GROWN = ("RESOLUTION", "CHANNEL_MIN") + UNTRAINED  # a network grown to a higher resolution takes these from the run


def growing_from(cfg, given, resolution):
    """Whether --init-from's network of `resolution` starts a run that grows it to the higher
    --resolution (--progressive: its layers kept, the higher ones added); a run at another
    resolution without --progressive is refused."""
    if cfg.resolution <= resolution or ("RESOLUTION" not in given and not cfg.progressive):
        return False  # the network's own resolution (a preset's is overridden, as for every setting)
    if not cfg.progressive:
        raise UserError(f"--resolution {cfg.resolution}: --init-from {cfg.init_from} is {resolution}x{resolution}; "
                        "growing it to a higher resolution needs --progressive")
    if "PROGRESSIVE_START" in given and given["PROGRESSIVE_START"] != resolution:
        raise UserError(f"--progressive-start {given['PROGRESSIVE_START']}: a run grown from --init-from "
                        f"{cfg.init_from} starts at its resolution, {resolution}; drop it")
    return True
