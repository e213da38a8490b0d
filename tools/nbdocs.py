#!/usr/bin/env python
"""The chapters with their outputs, and the docs site built from them.

    python tools/nbdocs.py execute [NB ...]   run the chapters, save their outputs into nbs/*.ipynb (`make docs`)
    python tools/nbdocs.py check [NB ...]     run them as nbdev-test does; fail unless the committed outputs are current
    python tools/nbdocs.py site               write the mkdocs sources (_docs/src/) and build the site (_docs/site/)

Execution is nbdev-test's: the same cells (the `tst_flags` of pyproject's [tool.nbdev] are skipped, `#| eval: false`
too), execnb's CaptureShell, the notebook's folder as working directory, IN_TEST=1. On top of that, for outputs that
do not change from run to run: figures as plain PNG at matplotlib's 100 dpi (not retina), one torch/BLAS thread,
PYTHONHASHSEED=0, progress bars off (CONDIFF_PROGRESS=off: a bar's text holds times), and nbdev-clean afterwards
(no execution counts, timings or cell ids). A skipped (slow) cell keeps the outputs committed from its last manual run.
"""
from __future__ import annotations
import os, sys

ENV = dict(OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', OPENBLAS_NUM_THREADS='1', CONDIFF_PROGRESS='off', MPLBACKEND='agg')


def _setup_env():
    "Set before torch/numpy load, here and in the worker processes (spawned, one per notebook, they inherit it)."
    os.environ.update(ENV)
    if os.environ.get('PYTHONHASHSEED') != '0':  # str hashes (set order) must not vary between runs: re-exec once
        os.environ['PYTHONHASHSEED'] = '0'
        os.execv(sys.executable, [sys.executable] + sys.argv)


import argparse, base64, copy, io, json, re, shutil, subprocess, time, traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / 'nbs'
DOCS = ROOT / '_docs'           # not committed: mkdocs.yml (generated), src/ (the pages), site/ (the built site)
DOCS_SRC, SITE = DOCS / 'src', DOCS / 'site'
MAX_NBS_BYTES = 10_000_000      # all of nbs/ stays under 10 MB
FIG_TOL = 0.005                 # a re-executed figure may differ from the committed one in at most 0.5 % of pixels


def chapters(paths=None) -> list[Path]:
    "The notebooks to run: `paths`, or every nbs/*.ipynb in file-name order."
    if paths:
        out = [Path(p).resolve() for p in paths]
        for p in out:
            if p.suffix != '.ipynb' or not p.is_file(): raise SystemExit(f'nbdocs: {p}: not a notebook file')
        return out
    return sorted(p for p in NBS.glob('*.ipynb') if not p.name.endswith('_out.ipynb'))


# ---------------------------------------------------------------- executing
def _skip_flags():
    from nbdev.config import get_config
    f = get_config(NBS).tst_flags
    return f.split() if isinstance(f, str) else list(f or [])


def run_notebook(fn: Path):
    "Execute `fn` as nbdev-test does: (the notebook with outputs, seconds, indices of the cells run), or raise with the traceback."
    from nbdev.process import NBProcessor
    from nbdev.test import _skip_cell  # nbdev-test's own rule for the cells it leaves out
    from execnb.shell import CaptureShell
    from fastcore.foundation import working_directory
    os.environ['IN_TEST'] = '1'
    if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))
    nb = NBProcessor(fn, rm_directives=False, process=True).nb
    skip = _skip_cell(nb, _skip_flags())
    t0 = time.time()
    k = CaptureShell(fn, mpl_format='png')
    with working_directory(fn.parent):
        try: k.run_all(nb, exc_stop=True, preproc=skip)
        except Exception as e: raise RuntimeError(k.prettytb(fname=fn) or traceback.format_exc()) from e
    ran = [i for i, c in enumerate(nb.cells) if not skip(c)]
    return nb, time.time() - t0, ran


def _clean(nb_dict) -> dict:
    "nbdev-clean, in memory (the repository's settings): what a committed notebook holds."
    from nbdev.clean import _nbdev_clean
    nb = copy.deepcopy(nb_dict)
    _nbdev_clean(nb, path=NBS)
    for c in nb['cells']: c.pop('directives_', None)
    return nb


def _plain(nb) -> dict:
    "An execnb/fastcore notebook as plain JSON data."
    return json.loads(json.dumps(nb, default=lambda o: dict(o) if hasattr(o, 'keys') else str(o)))


def _worker(args):
    fn, mode = args
    fn = Path(fn)
    try:
        nb, secs, ran = run_notebook(fn)
    except Exception as e:
        return str(fn), None, 0.0, [], str(e)
    return str(fn), _clean(_plain(nb)), secs, ran, None


def _write(fn: Path, nb: dict):
    "Write `nb` as nbdev does (fastcore's nb2str: 1-space indent, trailing newline), via a temporary file."
    from fastcore.nbio import nb2str, dict2nb
    tmp = fn.with_name(f'.{fn.name}.tmp')
    tmp.write_text(nb2str(dict2nb(nb)), encoding='utf-8')
    tmp.replace(fn)


def _execute_all(files, mode, jobs):
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing as mp
    if jobs <= 1 or len(files) == 1:
        yield from map(_worker, [(str(f), mode) for f in files]); return
    with ProcessPoolExecutor(jobs, mp_context=mp.get_context('spawn'), max_tasks_per_child=1) as ex:
        yield from ex.map(_worker, [(str(f), mode) for f in files])


# ---------------------------------------------------------------- comparing
_PNG = 'image/png'


def _png_pixels(b64):
    from PIL import Image
    import numpy as np
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert('RGBA'), dtype=np.int16)


def figure_difference(a_b64: str, b_b64: str) -> float:
    "Fraction of pixels that differ by more than 8 levels in some channel (1.0 if the sizes differ)."
    if a_b64 == b_b64: return 0.0
    a, b = _png_pixels(a_b64), _png_pixels(b_b64)
    if a.shape != b.shape: return 1.0
    return float((abs(a - b).max(-1) > 8).mean())


def _texts(o):
    "The text an output shows (stream text, or every non-image mime type), for an exact comparison."
    if o['output_type'] == 'stream': return {o['name']: ''.join(o['text'])}
    if o['output_type'] == 'error': return {'error': o.get('ename', '') + ': ' + o.get('evalue', '')}
    d = o.get('data', {})
    return {k: v if isinstance(v, str) else ''.join(v) for k, v in d.items() if not k.startswith('image/')}


def _images(o):
    return [(k, o['data'][k] if isinstance(o['data'][k], str) else ''.join(o['data'][k]))
            for k in sorted(o.get('data', {})) if k.startswith('image/')]


def compare_outputs(committed: dict, fresh: dict, ran: list[int], name: str) -> list[str]:
    """What differs between the committed and the re-executed outputs of the cells that ran: the number and kind of
    outputs, every text exactly, every figure's size and pixels (at most `FIG_TOL` of them may differ)."""
    problems = []
    cc, fc = committed['cells'], fresh['cells']
    if len(cc) != len(fc): return [f'{name}: {len(cc)} cells committed, {len(fc)} after re-execution']
    for i in ran:
        a, b = cc[i].get('outputs', []), fc[i].get('outputs', [])
        head = ''.join(cc[i]['source']).strip().splitlines()
        where = f'{name} cell {i} ({head[0][:60] if head else "empty"!r})'
        if len(a) != len(b):
            problems.append(f'{where}: {len(a)} outputs committed, {len(b)} now'); continue
        for j, (oa, ob) in enumerate(zip(a, b)):
            ta, tb = _texts(oa), _texts(ob)
            if ta != tb:
                k = next(k for k in sorted(set(ta) | set(tb)) if ta.get(k) != tb.get(k))
                problems.append(f'{where}, output {j} ({k}): committed {ta.get(k, "")[:200]!r}, now {tb.get(k, "")[:200]!r}')
            ia, ib = _images(oa), _images(ob)
            if [k for k, _ in ia] != [k for k, _ in ib]:
                problems.append(f'{where}, output {j}: figures {[k for k, _ in ia]} committed, {[k for k, _ in ib]} now')
                continue
            for (k, va), (_, vb) in zip(ia, ib):
                if k != _PNG: continue
                d = figure_difference(va, vb)
                if d > FIG_TOL: problems.append(f'{where}, output {j}: figure differs in {d:.1%} of its pixels')
    return problems


def output_counts(nb: dict) -> tuple[int, int]:
    "(code cells with outputs, figures) of a notebook."
    cells = [c for c in nb['cells'] if c['cell_type'] == 'code']
    return (sum(bool(c.get('outputs')) for c in cells),
            sum(1 for c in cells for o in c.get('outputs', []) if any(k.startswith('image/') for k in o.get('data', {}))))


def nbs_bytes() -> int:
    return sum(p.stat().st_size for p in NBS.rglob('*.ipynb'))


# ---------------------------------------------------------------- commands
def cmd_execute(a):
    files, t0, failed = chapters(a.notebooks), time.time(), []
    for fn, nb, secs, ran, err in _execute_all(files, 'execute', a.jobs):
        fn = Path(fn)
        if err:
            failed.append(fn.name); sys.stderr.write(err + '\n'); continue
        committed = json.loads(fn.read_text())
        # a cell that did not run (slow, notest) keeps its committed outputs
        for i, c in enumerate(nb['cells']):
            if c['cell_type'] == 'code' and i not in ran and i < len(committed['cells']):
                c['outputs'] = committed['cells'][i].get('outputs', [])
        _write(fn, _clean(nb))
        n_out, n_fig = output_counts(nb)
        print(f'{fn.name}: {secs:.0f} s, {n_out} cells with outputs, {n_fig} figures', flush=True)
    print(f'executed {len(files) - len(failed)} of {len(files)} notebooks in {time.time() - t0:.0f} s; '
          f'nbs/ holds {nbs_bytes() / 1e6:.2f} MB')
    if failed: raise SystemExit(f'nbdocs execute: failed: {", ".join(failed)}')
    if nbs_bytes() > MAX_NBS_BYTES: raise SystemExit(f'nbdocs execute: nbs/ is over {MAX_NBS_BYTES / 1e6:.0f} MB')


def cmd_check(a):
    files, t0, failed, problems = chapters(a.notebooks), time.time(), [], []
    for fn, nb, secs, ran, err in _execute_all(files, 'check', a.jobs):
        fn = Path(fn)
        if err:
            failed.append(fn.name); sys.stderr.write(err + '\n'); continue
        committed = _clean(json.loads(fn.read_text()))
        p = compare_outputs(committed, nb, ran, fn.name)
        problems += p
        print(f'{fn.name}: {secs:.0f} s, {"outputs current" if not p else f"{len(p)} outputs differ"}', flush=True)
    size = nbs_bytes()
    if size > MAX_NBS_BYTES: problems.append(f'nbs/ holds {size / 1e6:.1f} MB, over {MAX_NBS_BYTES / 1e6:.0f} MB')
    print(f'checked {len(files)} notebooks in {time.time() - t0:.0f} s')
    if failed: sys.stderr.write(f'nbdocs check: notebooks failed: {", ".join(failed)}\n')
    if problems:
        sys.stderr.write('nbdocs check: committed outputs are not current (run `make docs` and commit):\n  '
                         + '\n  '.join(problems) + '\n')
    if failed or problems: raise SystemExit(1)
    print('Success: every notebook ran and reproduced its committed outputs.')


# ---------------------------------------------------------------- the site
def _strip_directives(nb: dict) -> dict:
    "The notebook a reader sees: no `#| hide` cells, no directive lines, no empty cells, no slow-cell markers."
    out = copy.deepcopy(nb)
    cells = []
    for c in out['cells']:
        src = ''.join(c['source'])
        if c['cell_type'] == 'code':
            lines = src.splitlines()
            if any(re.match(r'\s*#\|\s*hide\s*$', l) for l in lines): continue
            src = '\n'.join(l for l in lines if not re.match(r'\s*#\|', l)).strip('\n')
            if not src.strip() and not c.get('outputs'): continue
        c['source'] = src
        cells.append(c)
    out['cells'] = cells
    return out


def _api_page(module: str) -> str:
    "Markdown for one module: every public name (and the public methods patched onto its classes), nbdev's show_doc."
    import importlib, inspect
    from nbdev.showdoc import show_doc
    import condiff._modidx as mi
    mod = importlib.import_module(module)
    syms = mi.d['syms'].get(module, {})
    names = list(getattr(mod, '__all__', []))
    parts = [f'# `{module}`\n', f'Generated from the docstrings and docments of `{module.replace(".", "/")}.py` '
             f'(its source notebook is the chapter of the same name).\n']
    for n in names:
        obj = getattr(mod, n, None)
        if obj is None or not (inspect.isclass(obj) or callable(obj)): continue
        parts.append(_show(show_doc(obj, name=n)))
        if inspect.isclass(obj):
            for full in syms:
                meth = full[len(module) + 1:]
                if meth.startswith(n + '.') and not meth.split('.')[-1].startswith('_'):
                    m = getattr(obj, meth.split('.')[-1], None)
                    if m is not None and callable(m): parts.append(_show(show_doc(m, name=meth)))
    return '\n\n'.join(parts)  # blank lines between entries: a '---' right under text would make it a heading


def _show(r) -> str:
    md = r._repr_markdown_()
    md = re.sub(r'^\[source\]\([^)]*\)\{[^}]*\}\s*$', '', md, flags=re.M)  # Quarto-style link to a GitHub line
    return md.replace('\n### ', '\n## ', 1).replace('\n#### ', '\n### ', 1)


def _index_md(stems: list[str]) -> str:
    "README.md as the index page: chapter names in code spans become links to their pages."
    text = (ROOT / 'README.md').read_text()
    for s in sorted(stems, key=len, reverse=True):
        text = re.sub(rf'`{re.escape(s)}`', f'[`{s}`]({s}.ipynb)', text)
    return text.replace('`DEVELOPING.md`', '[`DEVELOPING.md`](DEVELOPING.md)')


def _title(nb: dict, stem: str) -> str:
    for c in nb['cells']:
        if c['cell_type'] == 'markdown':
            m = re.search(r'^#\s+(.+)$', ''.join(c['source']), flags=re.M)
            if m: return f'{stem}: {m.group(1).strip()}'
    return stem


MKDOCS_YML = """\
# Generated by tools/nbdocs.py (`make docs-site`); edit the generator, not this file.
site_name: condiff
site_description: Image-conditioned diffusion models for medical anomaly detection, notebook-first
docs_dir: {docs}
site_dir: {site}
use_directory_urls: false   # pages open from the file system, no server
theme:
  name: material
  font: false               # no web fonts from the network: the system's
  features: [navigation.sections, navigation.top, search.highlight]
plugins:
  - search
  - offline                 # search index as a script: works from file://
  - mkdocs-jupyter:
      execute: false        # the committed outputs are shown, nothing is run here
      include_source: false
      ignore_h1_titles: true
      include_requirejs: false
      custom_mathjax_url: "assets/mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full,Safe,condiff"  # a local copy (jupyter-server-mathjax)
extra:
  polyfills: [assets/iframe-worker-shim.js]  # search from file:// (vendored; the offline plugin's default is a CDN URL)
extra_css: [assets/extra.css]
markdown_extensions: [attr_list, admonition, tables, toc, pymdownx.superfences, pymdownx.highlight]
nav:
{nav}
"""


def cmd_site(a):
    import yaml
    global DOCS, DOCS_SRC, SITE
    if a.out: DOCS = Path(a.out).resolve()
    DOCS_SRC, SITE = DOCS / 'src', DOCS / 'site'
    if DOCS.exists(): shutil.rmtree(DOCS)
    (DOCS_SRC / 'api').mkdir(parents=True)
    files = chapters()
    stems, chapter_nav = [], []
    for fn in files:
        nb = json.loads(fn.read_text())
        (DOCS_SRC / fn.name).write_text(json.dumps(_strip_directives(nb), indent=1))
        stems.append(fn.stem)
        chapter_nav.append({_title(nb, fn.stem): fn.name})
    (DOCS_SRC / 'index.md').write_text(_index_md(stems))
    shutil.copy(ROOT / 'DEVELOPING.md', DOCS_SRC / 'DEVELOPING.md')
    assets = DOCS_SRC / 'assets'
    assets.mkdir()
    shutil.copy(ROOT / 'tools' / 'vendor' / 'iframe-worker' / 'shim.js', assets / 'iframe-worker-shim.js')
    (assets / 'extra.css').write_text('.jp-InputPrompt, .jp-OutputPrompt { display: none !important; }  /* no "In [ ]:" */\n')
    import jupyter_server_mathjax
    shutil.copytree(Path(jupyter_server_mathjax.__file__).parent / 'static', assets / 'mathjax')
    (assets / 'mathjax' / 'config' / 'condiff.js').write_text(  # the fonts that package ships (STIX-Web), not TeX's
        'MathJax.Hub.Config({"HTML-CSS": {availableFonts: ["STIX-Web"], preferredFont: "STIX-Web", webFont: "STIX-Web", '
        'imageFont: null}});\n'
        'MathJax.Ajax.loadComplete("[MathJax]/config/condiff.js");\n')
    import condiff._modidx as mi
    api_nav = []
    for module in sorted(mi.d['syms']):
        name = module.split('.', 1)[1]
        (DOCS_SRC / 'api' / f'{name}.md').write_text(_api_page(module))
        api_nav.append({module: f'api/{name}.md'})
    nav = [{'Home': 'index.md'}, {'Chapters': [e for e, s in zip(chapter_nav, stems) if s[0].isdigit()]},
           {'Papermill notebooks': [e for e, s in zip(chapter_nav, stems) if not s[0].isdigit()]},
           {'API reference': api_nav}, {'Developing': 'DEVELOPING.md'}]
    nav_yml = yaml.safe_dump(nav, allow_unicode=True, sort_keys=False)
    cfg = MKDOCS_YML.format(docs=DOCS_SRC.name, site=SITE.name, nav='\n'.join('  ' + l for l in nav_yml.splitlines()))
    (DOCS / 'mkdocs.yml').write_text(cfg)
    t0 = time.time()
    r = subprocess.run([str(Path(sys.executable).with_name('mkdocs')), 'build', '--clean', '-q', '-f', str(DOCS / 'mkdocs.yml')],
                       cwd=ROOT, env={**os.environ, 'NO_MKDOCS_2_WARNING': '1'})
    if r.returncode: raise SystemExit(f'nbdocs site: mkdocs build failed (exit {r.returncode})')
    n = len(list(SITE.rglob('*.html')))
    print(f'site built in {time.time() - t0:.0f} s ({n} pages, {sum(p.stat().st_size for p in SITE.rglob("*") if p.is_file()) / 1e6:.1f} MB): '
          f'open {SITE / "index.html"}')


def main(argv=None):
    _setup_env()
    p = argparse.ArgumentParser(prog='nbdocs', description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='cmd', required=True)
    for name, f in (('execute', cmd_execute), ('check', cmd_check)):
        s = sub.add_parser(name)
        s.add_argument('notebooks', nargs='*', help='notebooks (default: every nbs/*.ipynb)')
        s.add_argument('--jobs', type=int, default=2, help='worker processes (default 2)')
        s.set_defaults(f=f)
    s = sub.add_parser('site')
    s.add_argument('--out', help='folder for mkdocs.yml, src/ and site/ (default: _docs)')
    s.set_defaults(f=cmd_site)
    a = p.parse_args(argv)
    if getattr(a, 'jobs', 1) < 1: p.error(f'--jobs {a.jobs}: must be an integer >= 1')
    a.f(a)


if __name__ == '__main__':
    main()
