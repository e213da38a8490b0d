"""The docs site in a real browser (issue 14): `tools/nbdocs.py site` builds it, headless Chromium opens two chapter
pages from the file system (no server) and checks that every image loaded, that every local link points at a file of
the site (and its #anchor exists), that no resource failed to load, and that the offline search finds a page.
Screenshots go to $CONDIFF_SCREENSHOTS (a folder; default: the test's temporary folder).
Skipped when Chromium is absent: `make chromium` installs Debian's package."""
import base64, json, os, shutil, subprocess, sys, tempfile, time, urllib.parse, urllib.request
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = next((shutil.which(n) for n in ('chromium', 'chromium-browser', 'google-chrome') if shutil.which(n)), None)
pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason='Chromium is absent: `make chromium` (apt-get install -y chromium) installs it'),
              pytest.mark.skipif(shutil.which('mkdocs', path=str(Path(sys.executable).parent)) is None,
                                 reason='mkdocs is not installed: pip install -e ".[dev]"')]
websocket = pytest.importorskip('websocket', reason='websocket-client is not installed: pip install -e ".[dev]"')

# (page glob, heading keyword of the figure to screenshot, screenshot name): robust to chapter renumbering
PAGES = [('*_tasks.html', 'gallery', 'tasks_gallery.png'), ('*_inference.html', 'trained model', 'inference_restorations.png')]


class Chromium:
    "Headless Chromium driven over the DevTools protocol (one page), with the console errors it reports."
    def __init__(self, profile: Path, width=1280, height=1000):
        self.proc = subprocess.Popen([CHROMIUM, '--headless=new', '--no-sandbox', '--disable-gpu', '--no-first-run',
                                      '--remote-debugging-port=0', f'--user-data-dir={profile}', f'--window-size={width},{height}',
                                      '--allow-file-access-from-files', 'about:blank'],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / 'DevToolsActivePort'
        for _ in range(300):
            if port_file.exists() and port_file.read_text().count('\n') >= 1: break
            if self.proc.poll() is not None: raise RuntimeError(f'chromium exited with {self.proc.returncode}')
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        pages = json.load(urllib.request.urlopen(f'http://127.0.0.1:{port}/json/list', timeout=10))
        ws = next(p['webSocketDebuggerUrl'] for p in pages if p['type'] == 'page')
        self.ws, self.id, self.events = websocket.create_connection(ws, timeout=60, suppress_origin=True), 0, []
        for m in ('Page.enable', 'Runtime.enable', 'Log.enable'): self.call(m)
        self.call('Emulation.setDeviceMetricsOverride', width=width, height=height, deviceScaleFactor=1, mobile=False)

    def call(self, method, **params):
        self.id += 1
        self.ws.send(json.dumps(dict(id=self.id, method=method, params=params)))
        while True:
            m = json.loads(self.ws.recv())
            if m.get('id') == self.id:
                if 'error' in m: raise RuntimeError(f'{method}: {m["error"]}')
                return m.get('result', {})
            self.events.append(m)

    def wait_event(self, name, timeout=60):
        t0 = time.time()
        while time.time() - t0 < timeout:
            for i, e in enumerate(self.events):
                if e.get('method') == name: return self.events.pop(i)
            self.events.append(json.loads(self.ws.recv()))
        raise TimeoutError(name)

    def js(self, expr, timeout=60):
        r = self.call('Runtime.evaluate', expression=expr, returnByValue=True, awaitPromise=True, timeout=timeout * 1000)
        if 'exceptionDetails' in r: raise RuntimeError(f'{expr[:80]}: {r["exceptionDetails"]}')
        return r['result'].get('value')

    def open(self, url):
        self.events.clear()
        self.call('Page.navigate', url=url)
        self.wait_event('Page.loadEventFired')
        # MathJax typesets after load: wait until its queue is empty (pages without it pass at once)
        self.js("new Promise(r => { const t0 = Date.now(); (function w() { const h = window.MathJax && MathJax.Hub; "
                "if (!h || (h.queue && h.queue.pending === 0 && !h.queue.running) || Date.now() - t0 > 20000) r(true); "
                "else setTimeout(w, 100); })(); })")

    def errors(self):
        "Console/log errors so far (a failed resource shows here as 'Failed to load resource ...')."
        out = []
        for e in self.events:
            if e.get('method') == 'Log.entryAdded' and e['params']['entry']['level'] == 'error':
                url, text = e['params']['entry'].get('url', ''), e['params']['entry']['text']
                if url == 'about:blank' or "font at 'about:blank'" in text: continue  # MathJax probing for web fonts
                out.append(f"{url}: {text}")
            if e.get('method') == 'Runtime.exceptionThrown':
                out.append(str(e['params']['exceptionDetails'].get('exception', {}).get('description', e['params'])))
        return out

    def screenshot(self, path: Path):
        path.write_bytes(base64.b64decode(self.call('Page.captureScreenshot', format='png')['data']))

    def close(self):
        try: self.ws.close()
        finally:
            self.proc.terminate()
            try: self.proc.wait(10)
            except subprocess.TimeoutExpired: self.proc.kill()


@pytest.fixture(scope='module')
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp('docs')
    r = subprocess.run([sys.executable, str(ROOT / 'tools' / 'nbdocs.py'), 'site', '--out', str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return out / 'site'


@pytest.fixture(scope='module')
def browser(tmp_path_factory):
    b = Chromium(tmp_path_factory.mktemp('chromium-profile'))
    yield b
    b.close()


def _local_target(href: str, page: Path):
    "The file a file:// link points at (None for other schemes), and its #fragment."
    u = urllib.parse.urlparse(href)
    if u.scheme != 'file': return None, None
    return Path(urllib.parse.unquote(u.path)), urllib.parse.unquote(u.fragment)


@pytest.mark.parametrize('pattern,keyword,shot', PAGES)
def test_chapter_page_in_chromium(site, browser, pattern, keyword, shot, tmp_path):
    pages = sorted(site.glob(pattern))
    assert len(pages) == 1, f'{pattern}: {pages}'
    page = pages[0]
    browser.open(page.as_uri())
    assert browser.js('document.title').startswith(page.stem.split('_', 1)[0]) or browser.js('document.title')
    imgs = browser.js("[...document.querySelectorAll('article img')].map(i => ({src: i.src.slice(0, 60), w: i.naturalWidth, "
                      "h: i.naturalHeight, done: i.complete}))")
    assert len(imgs) >= 1, f'{page.name}: no figure on the page'
    broken = [i for i in imgs if not (i['done'] and i['w'] > 0 and i['h'] > 0)]
    assert not broken, f'{page.name}: images that did not load: {broken}'
    # every link to a local file exists; an anchor into a page exists there
    links = browser.js("[...document.querySelectorAll('a[href]')].map(a => a.href)")
    ids_cache, bad = {}, []
    for href in links:
        target, frag = _local_target(href, page)
        if target is None: continue
        if not target.exists(): bad.append(href); continue
        if frag and target.suffix == '.html':
            if target not in ids_cache:
                import re
                ids_cache[target] = set(re.findall(r'id="([^"]+)"', target.read_text(errors='replace')))
            if frag not in ids_cache[target]: bad.append(href)
    assert not bad, f'{page.name}: broken links: {bad[:10]}'
    errs = browser.errors()
    assert not errs, f'{page.name}: errors in the console: {errs[:10]}'
    # the figure the issue asks for: the first figure after its section's heading, scrolled to the bottom of the view
    # (the printed numbers above it stay in view), then the screenshot
    ok = browser.js(f"(() => {{ const h = [...document.querySelectorAll('article h2, article h3')].find(h => "
                    f"h.textContent.toLowerCase().includes({keyword!r})); if (!h) return 'no heading'; "
                    f"const img = [...document.querySelectorAll('article img')].find(i => h.compareDocumentPosition(i) & "
                    f"Node.DOCUMENT_POSITION_FOLLOWING); if (!img) return 'no figure after the heading'; "
                    f"img.scrollIntoView({{block: 'end'}}); return 'ok'; }})()")
    assert ok == 'ok', f'{page.name}: {ok} ({keyword!r})'
    time.sleep(0.3)
    shots = Path(os.environ.get('CONDIFF_SCREENSHOTS') or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    browser.screenshot(shots / shot)
    from PIL import Image
    im = Image.open(shots / shot)
    assert im.size == (1280, 1000)
    assert len(set(im.convert('L').resize((64, 50)).tobytes())) > 8, 'the screenshot is blank'


def test_offline_search_finds_a_chapter(site, browser):
    "Material's search works from file:// (the offline plugin's inlined index, the vendored iframe-worker shim)."
    browser.open((site / 'index.html').as_uri())
    browser.js("document.querySelector('input.md-search__input').focus()")  # focusing starts the search worker
    browser.call('Input.insertText', text='SSIM')                              # typed, as a person does
    n = browser.js("""new Promise(r => { const t0 = Date.now(); (function w() {
        const n = document.querySelectorAll('.md-search-result__item').length;
        if (n > 0 || Date.now() - t0 > 20000) r(n); else setTimeout(w, 200); })(); })""")
    assert n > 0, 'the offline search returned no result for "SSIM"'
    assert not browser.errors(), browser.errors()[:5]
