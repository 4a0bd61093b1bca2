r"""A screenshot of the running demo page (``launch.demo``) after one edit, in headless Chromium.

    python -m launch.demo --workdir=runs/shapes/rl --port=7861 &
    python -m tools.demo_screenshot --url=http://127.0.0.1:7861 --scene=0 --output=docs/demo.png

Drives a real browser over the Chrome DevTools Protocol on a pipe (``--remote-debugging-pipe``:
no extra Python package): opens the page, picks a held-out scene in the dropdown (clicking its
option), waits for the page to fill the image, instruction and object phrase, clicks Edit,
waits for the edits and the verdict (the first edit compiles), and saves a full-page PNG.
Chromium from the Debian package (``apt-get install chromium``) or ``--chromium``.
"""

import argparse
import base64
import json
import os
import shutil
import subprocess
import tempfile
import time


class Browser:
  """Headless Chromium with one page, commanded over CDP on fds 3 (in) and 4 (out)."""

  def __init__(self, binary: str, width: int, height: int):
    to_chrome_r, self._to_chrome = os.pipe()
    self._from_chrome, from_chrome_w = os.pipe()
    self._profile = tempfile.mkdtemp(prefix="rl4pix_chromium_")

    def wire():  # in the child: the pipe ends onto fds 3 and 4 (via copies: they may be 3/4)
      into, out = os.dup(to_chrome_r), os.dup(from_chrome_w)
      os.dup2(into, 3)
      os.dup2(out, 4)

    self.process = subprocess.Popen(
        [binary, "--headless=new", "--remote-debugging-pipe", "--no-sandbox",
         "--disable-gpu", "--no-first-run", f"--user-data-dir={self._profile}",
         f"--window-size={width},{height}", "about:blank"],
        pass_fds=(3, 4), preexec_fn=wire,  # kept open after wire() (close_fds runs last)
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(to_chrome_r)
    os.close(from_chrome_w)
    self._buffer = b""
    self._next_id = 0
    target = self.call("Target.createTarget", url="about:blank")["targetId"]
    self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
    for domain in ("Page", "Runtime"):
      self.call(f"{domain}.enable", session=True)
    self.call("Emulation.setDeviceMetricsOverride", session=True, width=width, height=height,
              deviceScaleFactor=1, mobile=False)

  def _read_message(self) -> dict:
    while b"\0" not in self._buffer:
      chunk = os.read(self._from_chrome, 1 << 20)
      if not chunk:
        raise RuntimeError("Chromium closed the DevTools pipe.")
      self._buffer += chunk
    message, self._buffer = self._buffer.split(b"\0", 1)
    return json.loads(message)

  def call(self, method: str, session: bool = False, **params) -> dict:
    self._next_id += 1
    request = {"id": self._next_id, "method": method, "params": params}
    if session:
      request["sessionId"] = self.session
    os.write(self._to_chrome, json.dumps(request).encode() + b"\0")
    while True:
      message = self._read_message()
      if message.get("id") == self._next_id:
        if "error" in message:
          raise RuntimeError(f"{method}: {message['error']}")
        return message.get("result", {})

  def evaluate(self, expression: str):
    result = self.call("Runtime.evaluate", session=True, expression=expression,
                       returnByValue=True, awaitPromise=True)
    return result.get("result", {}).get("value")

  def wait_for(self, expression: str, timeout: float, what: str):
    end = time.time() + timeout
    while time.time() < end:
      value = self.evaluate(expression)
      if value:
        return value
      time.sleep(0.5)
    raise TimeoutError(f"waited {timeout:.0f} s for {what}")

  def click(self, selector: str) -> None:
    """A real mouse click (press, release) at the middle of the element."""
    box = self.evaluate(f"(() => {{ const e = document.querySelector(\"{selector}\"); "
                        "e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect(); "
                        "return [r.x + r.width / 2, r.y + r.height / 2]; })()")
    for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
      self.call("Input.dispatchMouseEvent", session=True, type=kind, x=box[0], y=box[1],
                button="left", clickCount=1)
    time.sleep(0.5)

  def close(self) -> None:
    self.process.kill()
    self.process.wait()
    shutil.rmtree(self._profile, ignore_errors=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--url", default="http://127.0.0.1:7860")
  parser.add_argument("--scene", type=int, default=0, help="Dropdown position of the scene.")
  parser.add_argument("--output", default="docs/demo.png")
  parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
  parser.add_argument("--timeout", type=float, default=900.0, help="Seconds for the edit.")
  args = parser.parse_args()
  browser = Browser(args.chromium, 1400, 1000)
  try:
    browser.call("Page.navigate", session=True, url=args.url)
    browser.wait_for("!!document.querySelector('#edit_button')", 120, "the page")
    # The dropdown: click its input (the options open), then click the scene's option.
    browser.click("#scene input")
    option = f"li[role=option][aria-label^='#{args.scene} ']"
    browser.wait_for(f"!!document.querySelector(\"{option}\")", 30, "the scene options")
    browser.click(option)
    browser.wait_for("document.querySelector('#instruction textarea').value", 120,
                     "the scene to fill the instruction")
    browser.wait_for("!!document.querySelector('#image img')", 60, "the scene's image")
    time.sleep(1.0)
    browser.click("#edit_button")
    browser.wait_for("(() => { const t = document.querySelector('#message').innerText; "
                     "return t.includes('steps, guidance') || t.includes('Cannot edit'); })()",
                     args.timeout, "the edits")
    time.sleep(2.0)  # the output images load after the message
    height = browser.evaluate("document.documentElement.scrollHeight")
    browser.call("Emulation.setDeviceMetricsOverride", session=True, width=1400,
                 height=int(height), deviceScaleFactor=1, mobile=False)
    time.sleep(1.0)
    shot = browser.call("Page.captureScreenshot", session=True, format="png")
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "wb") as f:
      f.write(base64.b64decode(shot["data"]))
    message = browser.evaluate("document.querySelector('#message').innerText")
    print(f"wrote {args.output} ({1400}x{height}); the page says:\n{message}")
  finally:
    browser.close()


if __name__ == "__main__":
  main()
