"""explore.py: the explorer's model side (the image of the controls, the newest request winning, bad
values, export that generate_images.py draws again, the nearest training slice, projection of an
upload and what an upload may not be), and its server (the page, the API, nothing else)."""
import base64
import io
import json
import shutil
import threading
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints
import explore
import generate_images

CFG = SimpleNamespace(directions=3, data_root="", project_steps=4, upload_mb=1)


def explorer_of(run_dir, **kw):
    state, path = checkpoints.load_checkpoint(run_dir / "Models")
    return explore.Explorer(state, path, torch.device("cpu"), SimpleNamespace(**{**vars(CFG), **kw}))


@pytest.fixture(scope="module")
def cond(cond_run):
    return explorer_of(cond_run)


@pytest.fixture(scope="module")
def uncond(uncond_run):
    return explorer_of(uncond_run)


def pixels(url):
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))).astype(int)


def png_bytes(array, fmt="PNG"):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def test_the_image_of_the_controls_and_its_neighbours(cond):
    info = cond.info()
    assert info["resolution"] == 32 and info["classes"] == ["AD", "NC"] and len(info["directions"]) == 3
    assert info["groups"] == dict(coarse=(0, 3), middle=(4, 7)) and info["class_axis"] and info["projector"]
    out = cond.render(dict(seed=3, psi=0.8))
    assert pixels(out["image"]).shape == (32, 32) and len(out["neighbours"]) == explore.NEIGHBOURS
    assert np.array_equal(pixels(out["image"]), pixels(cond.render(dict(seed=3, psi=0.8))["image"]))
    assert not np.array_equal(pixels(out["image"]), pixels(cond.render(dict(seed=4, psi=0.8))["image"]))
    near = [pixels(u) for u in out["neighbours"]]
    assert all(0 < np.abs(n - pixels(out["image"])).mean() for n in near)  # close by, not the same


def test_class_slider_and_directions_move_w(cond):
    w = {mix: cond.styles(dict(seed=2, class_mix=mix))[0] for mix in (0.0, 0.5, 1.0)}
    assert not torch.allclose(w[0.0], w[1.0])
    ad, nc = (cond.G.mapping(explore.seed_latents([2], cond.G.z_dim), torch.tensor([k]))[0] for k in (0, 1))
    assert torch.allclose(w[0.0], ad, atol=1e-5) and torch.allclose(w[1.0], nc, atol=1e-5)
    moved = cond.styles(dict(seed=2, directions=[1.5, 0, 0]))[0] - cond.styles(dict(seed=2))[0]
    assert torch.allclose(moved, 1.5 * cond.spreads[0] * cond.directions[0], atol=1e-5)
    axis, spread = cond.class_axis
    moved = cond.styles(dict(seed=2, class_move=-1))[0] - cond.styles(dict(seed=2))[0]
    assert torch.allclose(moved, -spread * axis, atol=1e-5)


def test_style_mixing_takes_the_second_seeds_w_at_its_layers(cond):
    base, other = cond.styles(dict(seed=2)), cond.styles(dict(seed=9))
    mixed = cond.styles(dict(seed=2, mix_seed=9, mix_layers=[0, 3]))
    assert torch.equal(mixed[:4], other[:4]) and torch.equal(mixed[4:], base[4:])
    assert len(cond.render(dict(seed=2, mix_seed=9, mix_layers=[0, 3]))["sources"]) == 2


def test_a_request_that_waited_behind_a_newer_one_is_dropped(uncond):
    """Two redraws arrive while one is drawing: the first waiting one is dropped, the newest drawn."""
    results = []
    with uncond.lock:  # a redraw is under way
        threads = [threading.Thread(target=lambda s=s: results.append((s, uncond.render(dict(seed=s)))))
                   for s in (1, 2)]
        for t in threads:
            t.start()
            time.sleep(0.2)  # seed 2's request arrives after seed 1's
    for t in threads:
        t.join()
    assert dict(results)[1] is None and dict(results)[2] is not None


@pytest.mark.parametrize("params,needle", [
    (dict(seed="x"), "seed must be an integer, got 'x'"), (dict(seed=1.5), "seed must be an integer"),
    (dict(seed=-1), "seed must be between 0"), (dict(seed=0, psi=float("nan")), "psi must be between"),
    (dict(seed=0, psi=7), "psi must be between 0.0 and 2.0"), (dict(seed=0, noise="loud"), "noise must be"),
    (dict(seed=0, directions=[0, 0, 0, 0]), "directions must be a list of at most 3"),
    (dict(seed=0, directions=["up"]), "direction must be a number"),
    (dict(seed=0, mix_seed=1, mix_layers=[5, 2]), "mix_layers must run from a lower"),
    (dict(seed=0, mix_seed=1, mix_layers=[0, 99]), "layer must be between 0 and 7"),
    (dict(w=[1, 2]), "w must be a list of 32 numbers"), (dict(seed=0, class_mix=2), "class_mix must be between"),
])
def test_bad_values_are_one_clear_line(cond, params, needle):
    with pytest.raises(explore.BadRequest, match=needle):
        cond.render(params)


def test_export_is_drawn_again_by_generate_images(cond, cond_run, tmp_path):
    params = dict(seed=5, psi=0.7, class_mix=0.3, directions=[0.5, -1, 0], mix_seed=8, mix_layers=[0, 3])
    shown = pixels(cond.render(params)["image"])
    exported = cond.export(params)
    assert "--w-file" in exported["command"] and len(exported["w"]) == cond.num_ws
    (tmp_path / "explore_w.json").write_text(json.dumps(exported))
    assert generate_images.main(["--checkpoint", str(cond_run / "Models"), "--w-file", str(tmp_path / "explore_w.json"),
                                 "--out-dir", str(tmp_path), "--device", "cpu"]) == 0
    drawn = np.asarray(Image.open(tmp_path / "explore_w.png")).astype(int)
    assert np.array_equal(drawn, shown)  # the same pixels


def test_the_nearest_training_slice_is_the_nearest_in_the_audits_space(cond):
    out = cond.nearest(dict(seed=4))
    train, (features, _, d_heldout) = cond.training_slices()
    image = cond.draw(cond.styles(dict(seed=4))[None], {})
    distances = torch.cdist(explore.memo_features(image), features)[0]
    assert out["distance"] == pytest.approx(distances.min().item(), rel=1e-5)
    assert np.array_equal(pixels(out["image"]), explore.quantize_uint8(train[distances.argmin()])[0].numpy())
    assert out["heldout_percentile"] == pytest.approx((d_heldout < distances.min()).float().mean().item() * 100)


def test_uploads_are_decoded_safely(cond):
    with pytest.raises(explore.BadRequest, match="not a readable PNG or JPEG"):
        cond.decode_upload(b"\x00not an image at all" * 10)
    with pytest.raises(explore.BadRequest, match="not GIF"):
        cond.decode_upload(png_bytes(np.zeros((8, 8), np.uint8), "GIF"))
    bomb = io.BytesIO()
    Image.new("L", (8000, 8000)).save(bomb, format="PNG", optimize=True)  # 64 MP from a small file
    with pytest.raises(explore.BadRequest, match="more than 16777216 pixels"):
        cond.decode_upload(bomb.getvalue())
    target = cond.decode_upload(png_bytes(np.full((40, 30), 255, np.uint8)))
    assert target.shape == (1, 1, 32, 32) and target.max() == 1 and target.min() == -1  # padded to square


def test_a_projection_runs_in_the_background_and_gives_a_w(cond):
    slice_png = png_bytes((np.random.default_rng(0).random((32, 32)) * 255).astype(np.uint8))
    assert cond.start_projection(slice_png) == dict(started=True, steps=4)
    for _ in range(600):
        status = cond.projection_status()
        if status["done"]:
            break
        time.sleep(0.05)
    assert status["done"] and status["error"] is None and status["step"] == 4 and len(status["w"]) == 32
    assert pixels(cond.render(dict(w=status["w"]))["image"]).shape == (32, 32)


# ---------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(uncond):
    srv = explore.serve(uncond, "127.0.0.1", 0, 1)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def fetch(url, body=None, kind="application/json"):
    request = urllib.request.Request(url, data=body, headers={"Content-Type": kind} if body is not None else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_the_page_works_offline():
    page = explore.PAGE.read_text()
    assert "http://" not in page and "https://" not in page and "<script src" not in page and "<link" not in page


def test_the_server_serves_the_page_and_its_api_and_nothing_else(server, tmp_path):
    status, page = fetch(server + "/")
    assert status == 200 and page == explore.PAGE.read_bytes()
    status, info = fetch(server + "/api/info")
    assert status == 200 and json.loads(info)["resolution"] == 32
    status, body = fetch(server + "/api/render", json.dumps(dict(seed=1)).encode())
    assert status == 200 and json.loads(body)["image"].startswith("data:image/png;base64,")
    for path in ("/../../etc/passwd", "/explore.py", "/api/render?file=/etc/passwd", "/Models"):
        assert fetch(server + path)[0] == 404
    status, body = fetch(server + "/api/render", b"{not json")
    assert status == 400 and json.loads(body)["error"] == "the request is not JSON"
    status, body = fetch(server + "/api/render", json.dumps(dict(seed="x")).encode())
    assert status == 400 and "seed must be an integer" in json.loads(body)["error"]
    status, body = fetch(server + "/api/project", b"\x89PNG" + b"x" * (2**20 + 10), "application/octet-stream")
    assert status == 413 and "larger than 1 MB" in json.loads(body)["error"]
    assert fetch(server + "/api/info")[0] == 200  # and it keeps serving


def test_a_host_other_than_loopback_warns(monkeypatch, cond_run, capsys):
    monkeypatch.setattr(explore.ThreadingHTTPServer, "serve_forever", lambda self: None)
    assert explore.main(["--checkpoint", str(cond_run / "Models"), "--host", "0.0.0.0", "--port", "0",
                         "--directions", "2", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert "warning: --host 0.0.0.0 lets other machines open the page" in err and "exploring" in out
    assert explore.is_loopback("127.0.0.1") and explore.is_loopback("localhost") and explore.is_loopback("::1")


def test_a_checkpoint_that_cannot_be_read_stops_at_start(tmp_path, capsys):
    bad = tmp_path / "checkpoint_00000001.pt"
    bad.write_bytes(b"garbage")
    assert explore.main(["--checkpoint", str(bad), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0]


# ---------------------------------------------------------------------------------------
# In a real browser: headless Chromium (Debian's chromium and chromium-driver, and selenium)
# ---------------------------------------------------------------------------------------
def chromium():
    webdriver = pytest.importorskip("selenium.webdriver")
    if not shutil.which("chromium") or not shutil.which("chromedriver"):
        pytest.skip("needs chromium and chromedriver (Debian: apt install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1400,1000"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    return webdriver.Chrome(options=options, service=service)


def wait_for(browser, condition, what, seconds=60):
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = browser.execute_script(condition)
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"the page did not {what} in {seconds} s")


def test_the_page_in_a_browser_redraws_as_controls_move_and_says_what_is_wrong(server, tmp_path):
    browser = chromium()
    try:
        browser.get(server + "/")
        wait_for(browser, "return document.body.dataset.drawn", "draw its first image")
        assert "32x32" in browser.find_element("id", "info").text
        first = browser.find_element("id", "main").get_attribute("src")
        assert len(browser.find_elements("css selector", "#neighbours img")) == explore.NEIGHBOURS
        browser.find_element("id", "next").click()  # seed 1
        wait_for(browser, f"return document.getElementById('main').src !== {json.dumps(first)}", "redraw")
        assert browser.find_element("id", "seed").get_attribute("value") == "1"
        drawn = browser.execute_script("return document.body.dataset.drawn")
        browser.execute_script("const s = document.getElementById('psi'); s.value = 0;"
                               "s.dispatchEvent(new Event('input'))")  # truncation 0: the mean image
        wait_for(browser, f"return document.body.dataset.drawn !== {json.dumps(drawn)}", "redraw at psi 0")
        assert browser.find_element("id", "psi-value").text == "0.00"
        browser.execute_script("const s = document.getElementById('seed'); s.value = '';"
                               "s.dispatchEvent(new Event('input'))")
        message = wait_for(browser, "return document.getElementById('message').textContent", "report a bad seed")
        assert "seed must be an integer" in message
        browser.save_screenshot(str(tmp_path / "explorer.png"))
        assert (tmp_path / "explorer.png").stat().st_size > 1000
    finally:
        browser.quit()
