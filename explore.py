"""Explore a trained generator in the browser: move through its latent space and watch the slice change.

    python explore.py                                   # the newest checkpoint in Models/
    python explore.py --checkpoint runs/a/Models/best.pt --port 8000
    ssh -L 7860:127.0.0.1:7860 gpu-node                 # then open http://127.0.0.1:7860 on your machine

Serves one page (explore.html, no file from elsewhere: it works offline) on --host:--port,
127.0.0.1 by default. On it: the image of a seed with a strip of its neighbours in W; truncation,
noise and (conditional model) the class and an AD <-> NC slider; style mixing with a second seed
over the coarse, middle or fine layers; sliders along the top principal directions of W (GANSpace)
and the AD-vs-NC direction; the nearest training slice against the held-out threshold of the
memorisation audit; projection of an uploaded slice; and export of the image (PNG) and of the
current w as JSON, which `generate_images.py --w-file` draws again.

Requests carry no path: the server reads only the checkpoint and data it was started with. A
redraw that arrives while another is drawing replaces it (the newest wins)."""
import deps  # noqa: F401  (first: stops with one line when this Python lacks a package)

# isort: split
import base64
import io
import ipaddress
import json
import sys
import threading
import warnings
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from checkpoints import load_checkpoint, load_discriminator, load_generator
from dataset import fit_image, load_slices, to_model_range
from distributed import resolve_device
from latent import class_direction, layer_groups, mix_styles, principal_directions
from metrics import memo_features, memorisation_reference, nearest
from ops import use_fast_kernels
from projector import project
from sampling import mapped, seed_latents, synthesize
from settings import UserError, checkpoint_settings, command, parse_settings, resolve_settings
from utils import quantize_uint8

PAGE = Path(__file__).with_name("explore.html")
NEIGHBOURS = 6  # images in the strip: the current w moved a little along fixed random directions
NEIGHBOUR_STEP = 0.5  # how far, in units of w's spread
W_SAMPLES = 4000  # seeded latents behind the principal directions and the class direction
MAX_PIXELS = 4096 * 4096  # uploads decoding to more pixels are refused (a small file can hold a huge image)
SEED_MAX = 2**31 - 1
TRAIN_SLICES = 2000  # training slices searched for the nearest (seeded choice; all of a smaller set)


class BadRequest(Exception):
    """A request the page can show as one line: a value missing, not a number, or out of range."""


def number(params, name, low, high, default=None, kind=float):
    """params[name] as a finite number of `kind` in [low, high], else BadRequest naming it."""
    value = params.get(name, default)
    try:
        if isinstance(value, bool) or value is None:
            raise ValueError
        value = kind(value)
        if kind is int and value != float(params.get(name, default)):
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise BadRequest(f"{name} must be a{'n integer' if kind is int else ' number'}, got {value!r}") from None
    if not (np.isfinite(value) and low <= value <= high):
        raise BadRequest(f"{name} must be between {low} and {high}, got {value!r}")
    return value


def png_url(image):
    """(C, H, W) image in [-1, 1] -> a data: URL of its PNG."""
    array = quantize_uint8(image[None])[0].permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class Explorer:
    """The model side of the page: a checkpoint's generator and what the page asks of it."""

    def __init__(self, state, path, device, cfg):
        self.state, self.path, self.device, self.cfg = state, path, device, cfg
        self.G = load_generator(state, device)
        self.D = load_discriminator(state, device) if "D" in state else None
        self.classes = list(state["class_names"]) if self.G.num_classes else []
        self.num_ws, self.resolution = self.G.num_ws, state["model_args"]["G"]["resolution"]
        self.w_mean, self.directions, self.spreads = principal_directions(self.G, cfg.directions, W_SAMPLES, device)
        self.w_spread = float(self.spreads[0]) if len(self.spreads) else 1.0
        self.class_axis = self.class_direction() if len(self.classes) == 2 else None
        g = torch.Generator().manual_seed(0)
        self.neighbour_steps = torch.randn(NEIGHBOURS, self.w_mean.shape[0], generator=g)
        self.neighbour_steps *= NEIGHBOUR_STEP * self.w_spread / self.neighbour_steps.norm(dim=1, keepdim=True)
        self.lock, self.lock_tickets, self.latest = threading.Lock(), threading.Lock(), 0
        self.data, self.project_job = None, None

    def class_direction(self):
        """The AD-vs-NC direction of a linear classifier on class-conditioned w (as --mode tsne fits)."""
        z = seed_latents(range(W_SAMPLES // 2), self.G.z_dim)
        w = torch.cat([mapped(self.G, z, torch.full([len(z)], k), 1.0, self.device) for k in (0, 1)]).numpy()
        direction, spread = class_direction(w, np.repeat([0, 1], len(z)))
        return torch.from_numpy(direction), spread

    def info(self):
        cfg = checkpoint_settings(self.state)
        return dict(checkpoint=str(self.path), step=self.state["step"], nimg=self.state["nimg"],
                    resolution=self.resolution, classes=self.classes, num_ws=self.num_ws,
                    groups=layer_groups(self.num_ws), directions=[float(s) for s in self.spreads],
                    class_axis=self.class_axis is not None, projector=self.D is not None,
                    settings=dict(z_dim=cfg.z_dim, w_dim=cfg.w_dim, channel_base=cfg.channel_base,
                                  channel_max=cfg.channel_max, loss=cfg.loss, conditional=cfg.conditional))

    # --- the current w, from the page's controls ------------------------------------------
    def styles(self, params):
        """Per-layer styles (num_ws, w_dim) of the page's controls: a seed (or a projected w), the
        class mix, truncation, moves along the directions, and style mixing with a second seed."""
        psi = number(params, "psi", 0.0, 2.0, 1.0)
        w = self.base_w(params, psi)
        moves = params.get("directions") or []
        if not isinstance(moves, list) or len(moves) > len(self.directions):
            raise BadRequest(f"directions must be a list of at most {len(self.directions)} numbers")
        for k, _ in enumerate(moves):
            w = w + number({"direction": moves[k]}, "direction", -5.0, 5.0) * self.spreads[k] * self.directions[k]
        if self.class_axis is not None and params.get("class_move") is not None:
            axis, spread = self.class_axis
            w = w + number(params, "class_move", -5.0, 5.0) * spread * axis
        ws = w[None].expand(self.num_ws, -1).clone()
        if params.get("mix_seed") is not None:
            first, last = (number({"layer": v}, "layer", 0, self.num_ws - 1, kind=int)
                           for v in (params.get("mix_layers") or [0, -1]))
            if first > last:
                raise BadRequest(f"mix_layers must run from a lower to a higher layer, got {first}-{last}")
            other = self.seed_w(number(params, "mix_seed", 0, SEED_MAX, kind=int), params, psi)
            ws = mix_styles(other[None], w[None], list(range(first, last + 1)), self.num_ws)[0, 0]
        return ws

    def base_w(self, params, psi):
        if params.get("w") is not None:  # a projected or imported w
            w = params["w"]
            if not (isinstance(w, list) and len(w) == self.w_mean.shape[0]):
                raise BadRequest(f"w must be a list of {self.w_mean.shape[0]} numbers")
            w = torch.tensor([number({"w": v}, "w", -1e4, 1e4) for v in w])
            return self.G.mapping.w_avg.mean(0).cpu().lerp(w, psi)
        return self.seed_w(number(params, "seed", 0, SEED_MAX, kind=int), params, psi)

    def seed_w(self, seed, params, psi):
        z = seed_latents([seed], self.G.z_dim)
        if not self.classes:
            return mapped(self.G, z, None, psi, self.device)[0]
        mix = number(params, "class_mix", 0.0, 1.0, 0.0)  # 0: the first class, 1: the second (2 classes)
        weights = torch.zeros(1, len(self.classes))
        if len(self.classes) == 2:
            weights[0] = torch.tensor([1 - mix, mix])
        else:
            weights[0, number(params, "class", 0, len(self.classes) - 1, 0, kind=int)] = 1
        return mapped(self.G, z, weights, psi, self.device)[0]

    def draw(self, ws, params):
        noise = params.get("noise", "const")
        if noise not in ("const", "random", "none"):
            raise BadRequest(f"noise must be const, random or none, got {noise!r}")
        return synthesize(self.G, ws, noise, 32, self.device)

    # --- what the page asks for ----------------------------------------------------------------
    def render(self, params):
        """The image of the controls, its neighbours and (when mixing) the two sources; None when a
        newer request arrived while this one waited (the newest wins: requests never queue up)."""
        with self.lock_tickets:
            ticket = self.latest = self.latest + 1
        with self.lock:
            if ticket != self.latest:
                return None
            ws = self.styles(params)
            main = self.draw(ws[None], params)[0]  # alone, as generate_images.py --w-file draws it: the same pixels
            batch = [ws + step for step in self.neighbour_steps]
            if params.get("mix_seed") is not None:
                psi = number(params, "psi", 0.0, 2.0, 1.0)
                mix_source = self.seed_w(number(params, "mix_seed", 0, SEED_MAX, kind=int), params, psi)
                batch += [self.styles(dict(params, mix_seed=None)), mix_source[None].expand(self.num_ws, -1)]
            images = self.draw(torch.stack(batch), params)
        out = dict(image=png_url(main), neighbours=[png_url(x) for x in images[:NEIGHBOURS]])
        if params.get("mix_seed") is not None:
            out["sources"] = [png_url(images[-2]), png_url(images[-1])]
        return out

    def export(self, params):
        """The current w (per-layer styles) and the controls, with the command that draws it again."""
        ws = self.styles(params)
        noise = params.get("noise", "const")
        return dict(checkpoint=str(self.path), controls={k: v for k, v in params.items() if k != "w"},
                    w=ws.tolist(), noise=noise,
                    command=f"python generate_images.py --checkpoint {self.path} --w-file explore_w.json "
                            f"--noise-mode {noise}")

    def training_slices(self):
        """The training slices (loaded on first use) and the memorisation audit's reference."""
        if self.data is None:
            train_cfg = checkpoint_settings(self.state, self.cfg.data_root)
            data = load_slices(train_cfg)
            pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:TRAIN_SLICES]
            train = to_model_range(data.images[pick])
            heldout = None
            try:
                test = load_slices(train_cfg, splits=["test"])
                heldout = to_model_range(test.images[:1000])
            except UserError:
                pass
            self.data = (train, memorisation_reference(train, heldout))
        return self.data

    def nearest(self, params):
        """The training slice nearest the current image (RMS distance, as the memorisation audit) and
        where that distance falls among held-out real slices' distances to their nearest."""
        train, (features, _, d_heldout) = self.training_slices()
        image = self.draw(self.styles(params)[None], params)
        distance, index = nearest(memo_features(image), features)
        out = dict(image=png_url(train[index[0]]), distance=float(distance[0]))
        if d_heldout is not None:
            out["heldout_percentile"] = float((d_heldout < distance[0]).float().mean() * 100)
            out["copy_threshold"] = float(torch.quantile(d_heldout, 0.01))
        return out

    # --- projection of an uploaded slice --------------------------------------------------------
    def start_projection(self, payload):
        if self.D is None:
            raise BadRequest("this checkpoint has no discriminator, which the projector needs")
        if self.project_job is not None and not self.project_job["done"]:
            raise BadRequest("a projection is running: wait for it to finish")
        target = self.decode_upload(payload)
        job = dict(step=0, steps=self.cfg.project_steps, done=False, w=None, error=None)
        self.project_job = job
        threading.Thread(target=self.run_projection, args=(target, job), daemon=True).start()
        return dict(started=True, steps=job["steps"])

    def decode_upload(self, payload):
        """An uploaded PNG/JPEG as a slice of this model: grayscale (or RGB), padded, resized."""
        Image.MAX_IMAGE_PIXELS = MAX_PIXELS
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(payload)) as img:
                    if img.format not in ("PNG", "JPEG"):
                        raise BadRequest(f"upload a PNG or JPEG slice, not {img.format or 'this file'}")
                    img.load()
                    mode = "L" if self.state["model_args"]["G"]["img_channels"] == 1 else "RGB"
                    array = fit_image(img.convert(mode), self.resolution)
        except BadRequest:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise BadRequest(f"the image has more than {MAX_PIXELS} pixels: refused") from None
        except Exception as e:  # noqa: BLE001 - PIL raises many types for a file that is not an image
            raise BadRequest(f"not a readable PNG or JPEG image ({type(e).__name__})") from None
        return to_model_range(torch.from_numpy(array.copy())[None])

    def run_projection(self, target, job):
        params = resolve_settings({"GEN_PROJECT_STEPS": self.cfg.project_steps}, "GEN_")
        weights = (torch.full([1, len(self.classes)], 1 / len(self.classes)) if self.classes else None)
        try:
            result = project(self.G, self.D, target, weights, params, self.device,
                             progress=lambda done, steps: job.update(step=done))
            job["w"] = result["ws"][0, 0].tolist()
        except Exception as e:  # noqa: BLE001 - reported on the page, the server goes on
            job["error"] = f"the projection failed: {e}"
        job["done"] = True

    def projection_status(self):
        job = self.project_job
        return dict(job) if job is not None else dict(done=True, w=None, step=0, steps=0, error=None)


# ---------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------
def handler_for(explorer, page, upload_limit):
    """A request handler serving `page` and the explorer's JSON API, and nothing else."""

    class Handler(BaseHTTPRequestHandler):
        server_version = "explore"

        def log_message(self, *args):  # one line per request is noise here
            pass

        def send(self, status, body, kind="application/json"):
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(data)

        def discard(self, length):
            """Read a refused upload away (up to a bound), so that the client gets the answer, not a reset."""
            if length > 64 * upload_limit or length < 0:
                self.close_connection = True
                return
            while length > 0:
                length -= len(self.rfile.read(min(length, 2**16))) or length

        def do_GET(self):
            routes = {"/": lambda: (page, "text/html; charset=utf-8"), "/api/info": explorer.info,
                      "/api/project": explorer.projection_status}
            if self.path not in routes:
                return self.send(HTTPStatus.NOT_FOUND, dict(error=f"no such page: {self.path}"))
            result = routes[self.path]()
            if isinstance(result, tuple):
                return self.send(HTTPStatus.OK, *result)
            self.send(HTTPStatus.OK, result)

        def do_POST(self):
            routes = {"/api/render": explorer.render, "/api/export": explorer.export,
                      "/api/nearest": explorer.nearest, "/api/project": explorer.start_projection}
            if self.path not in routes:
                return self.send(HTTPStatus.NOT_FOUND, dict(error=f"no such action: {self.path}"))
            try:
                length = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                length = -1
            if not 0 <= length <= upload_limit:
                self.discard(length)
                return self.send(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                 dict(error=f"the upload is larger than {upload_limit // 2**20} MB: refused"))
            body = self.rfile.read(length)
            try:
                if self.path == "/api/project":
                    return self.send(HTTPStatus.OK, explorer.start_projection(body))
                params = json.loads(body or b"{}")
                if not isinstance(params, dict):
                    raise BadRequest("the request must be a JSON object")
                if self.path == "/api/render":
                    result = explorer.render(params)
                    return self.send(HTTPStatus.OK, result if result is not None else dict(superseded=True))
                self.send(HTTPStatus.OK, routes[self.path](params))
            except (BadRequest, json.JSONDecodeError, UnicodeDecodeError) as e:
                self.send(HTTPStatus.BAD_REQUEST, dict(error=str(e) if isinstance(e, BadRequest) else
                                                       "the request is not JSON"))
            except UserError as e:  # training data that cannot be read, for the nearest slice
                self.send(HTTPStatus.CONFLICT, dict(error=str(e)))

    return Handler


def is_loopback(host):
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve(explorer, host, port, upload_mb):
    """The server, not yet serving (ThreadingHTTPServer.serve_forever serves)."""
    page = PAGE.read_bytes()
    try:
        return ThreadingHTTPServer((host, port), handler_for(explorer, page, upload_mb * 2**20))
    except OSError as e:
        raise UserError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None


@command
def main(argv=None):
    given, _ = parse_settings(argv, "EXPLORE_", __doc__)
    cfg = resolve_settings(given, "EXPLORE_")
    device = resolve_device(cfg.device)
    use_fast_kernels(device)
    state, path = load_checkpoint(cfg.checkpoint)
    explorer = Explorer(state, path, device, cfg)
    server = serve(explorer, cfg.host, cfg.port, cfg.upload_mb)
    if not is_loopback(cfg.host):
        print(f"warning: --host {cfg.host} lets other machines open the page, which has no login; "
              "prefer 127.0.0.1 and an SSH port forward", file=sys.stderr)
    host, port = server.server_address[:2]
    print(f"exploring {path} (step {state['step']}) at http://{host}:{port}  (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("\nstopped")
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
