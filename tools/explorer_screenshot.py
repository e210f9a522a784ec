"""Screenshot of explore.py's page in headless Chromium (the browser the tests drive), for README.

python tools/explorer_screenshot.py --checkpoint RUN/Models --out images_for_readme/explorer.png
Needs selenium and Debian's chromium and chromium-driver, as tests/test_explore.py's browser test.
"""
import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from selenium import webdriver

REPO = Path(__file__).resolve().parent.parent


def wait_for(browser, script, seconds=120):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if browser.execute_script(script):
            return
        time.sleep(0.2)
    sys.exit(f"the page did not answer `{script}` in {seconds} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", default="images_for_readme/explorer.png")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--mix-seed", type=int, default=3)
    parser.add_argument("--direction", type=float, default=1.5, help="the first direction slider's value")
    args = parser.parse_args()
    server = subprocess.Popen([sys.executable, str(REPO / "explore.py"), "--checkpoint", args.checkpoint,
                               "--port", "0"], stdout=subprocess.PIPE, text=True)  # 0: any free port
    started = server.stdout.readline().strip()
    print(started)
    address = re.search(r"http://\S+", started)
    if address is None:
        sys.exit("explore.py did not start (its error is above)")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    try:
        browser.get(address[0] + "/")
        wait_for(browser, "return document.body.dataset.drawn")

        def change(script):
            drawn = browser.execute_script("return document.body.dataset.drawn")
            browser.execute_script(script)
            wait_for(browser, f"return document.body.dataset.drawn !== {json.dumps(drawn)}")

        change(f"const s = document.getElementById('seed'); s.value = {args.seed}; s.dispatchEvent(new Event('input'))")
        change(f"document.getElementById('mix-seed').value = {args.mix_seed};"
               "document.getElementById('mix-on').click()")
        change(f"const s = document.querySelector('.direction'); s.value = {args.direction};"
               "s.dispatchEvent(new Event('input'))")
        browser.find_element("id", "nearest").click()
        wait_for(browser, "return document.getElementById('nearest-out').textContent.startsWith('RMS')")
        time.sleep(1)
        browser.save_screenshot(args.out)
        print(f"wrote {args.out}")
    finally:
        browser.quit()
        server.terminate()


if __name__ == "__main__":
    main()
