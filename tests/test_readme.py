"""The README's Python API example runs as written, and every relative link of the user docs resolves.

The example (the README's first ```python block) runs in a fresh interpreter from an empty directory,
so it takes its random-heads branch on the bundled SmolLM2; the only thing changed is the number of
new tokens, through the MAX_NEW_TOKENS variable the example reads. It fails if the API it shows
(runtime.load, tree.resolve, medusa.MedusaSpec / make_decoder, decode.Decoder) stops working, or if
greedy Medusa output stops matching greedy decoding (the example's own assert).
"""

import glob
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
DOCS = [README] + sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))

_FENCE = re.compile(r"^```")
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")


def _read(path):
  with open(path, encoding="utf-8") as f:
    return f.read()


def readme_python_example() -> str:
  m = re.search(r"^```python\n(.*?)^```", _read(README), re.S | re.M)
  assert m, "README.md has no ```python block"
  return m.group(1)


def _outside_code(text):
  """The lines of a markdown text outside fenced code blocks, with inline code removed."""
  fenced = False
  for line in text.splitlines():
    if _FENCE.match(line.strip()):
      fenced = not fenced
      continue
    if not fenced:
      yield re.sub(r"`[^`]*`", lambda m: m.group(0).strip("`"), line)


def _anchors(path):
  """GitHub's heading anchors of a markdown file: lowercase, punctuation dropped, spaces to hyphens."""
  out = set()
  for line in _outside_code(_read(path)):
    m = _HEADING.match(line)
    if m:
      out.add(re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-"))
  return out


def test_readme_python_example_runs(tmp_path):
  code = readme_python_example()
  assert "MAX_NEW_TOKENS" in code, "the test shortens the example through MAX_NEW_TOKENS"
  script = tmp_path / "readme_example.py"
  script.write_text(code)
  env = dict(os.environ, MAX_NEW_TOKENS="16", MPLBACKEND="Agg",
             PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
  proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, f"the README's example failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
  assert re.search(r"^vanilla: 16 tokens in \d+ forward passes$", proc.stdout, re.M), proc.stdout
  assert re.search(r"^medusa: 16 tokens in \d+ forward passes$", proc.stdout, re.M), proc.stdout


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: os.path.relpath(p, REPO))
def test_relative_links_resolve(doc):
  bad = []
  for line in _outside_code(_read(doc)):
    for target in _LINK.findall(line):
      if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
        continue
      path, _, anchor = target.partition("#")
      dest = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
      if not os.path.exists(dest):
        bad.append(f"{target}: no such file")
      elif anchor and dest.endswith(".md") and anchor not in _anchors(dest):
        bad.append(f"{target}: no heading '#{anchor}' in {os.path.relpath(dest, REPO)}")
  assert not bad, f"{os.path.relpath(doc, REPO)}: broken links:\n" + "\n".join(bad)


def test_layout_lists_every_module():
  """The README's Layout block names each module of the package and its subpackages, and only modules
  that exist."""
  text = _read(README)
  m = re.search(r"^## Layout\n.*?^```\n(.*?)^```", text, re.S | re.M)
  assert m, "README.md has no Layout block"
  listed = set(re.findall(r"\b(\w+)\.py\b", m.group(1)))
  modules = glob.glob(os.path.join(REPO, "medusa_jax", "**", "*.py"), recursive=True)
  package = {os.path.basename(p)[:-3] for p in modules} - {"__init__", "__main__"}
  experiments = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "experiments", "*.py"))}
  assert not package - listed, f"modules missing from the README's Layout: {sorted(package - listed)}"
  assert not listed - package - experiments, f"listed but absent: {sorted(listed - package - experiments)}"
