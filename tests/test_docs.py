"""The documentation runs as written: README.md and every docs/*.md page.

* Every ```python block is executed, each in a fresh namespace (no block relies on another), and what it
  prints is checked against the claim the text around it makes (``CHECKS``: every block must have one, so a
  new example cannot go unchecked).
* Every relative link and image (``[text](path)``, ``path#anchor``) points to a file of the repository, and an
  anchor to a heading of that file.
* The README names the commands CI runs (``.ci/run`` reads the test command from it).
* docs/api.md lists names that exist, and every public name of the library appears in it.
* The README's experiments table names experiments that exist.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", _text(path), flags=re.S)


def _number_after_colon(line: str) -> float:
    return float(line.rsplit(":", 1)[1])


# ------------------------------------------------------------------------------------------------
# What each example prints. Key: (page relative to the root, a string only that page's block contains).
# ------------------------------------------------------------------------------------------------


def _check_research(out: str) -> None:
    assert out.startswith("loss ") and "eval accuracy" in out, out


def _check_norms_readme(out: str) -> None:
    relative = _number_after_colon(out)
    assert out.startswith("largest difference") and relative < 1e-5, out


def _check_engine(out: str) -> None:
    assert out.startswith("(2, 4, 2, 4) "), out  # [seeds, learning rates, weight scales, records]


def _check_renorm_ghost(out: str) -> None:
    renorm, ghost = out.strip().splitlines()
    assert renorm.startswith("Batch Renorm at r_max=1, d_max=0") and _number_after_colon(renorm) < 1e-6, out
    # a group of 2 close rows has a large 1/sigma: float32 rounding of x * scale grows with it
    assert ghost.startswith("Ghost BN against groups") and _number_after_colon(ghost) < 1e-4, out


def _check_conv(out: str) -> None:
    precise, folded = out.strip().splitlines()
    errors = [float(v) for v in re.findall(r"(?:mean|var) ([-+.e0-9]+)", precise)]
    assert precise.startswith("precise statistics") and len(errors) == 2 and max(errors) < 1e-4, out
    assert folded.startswith("largest difference") and _number_after_colon(folded) < 1e-5, out


def _check_data_parallel(out: str) -> None:
    assert "device(s), largest difference from one device" in out and _number_after_colon(out) < 1e-5, out


def _check_data(out: str) -> None:
    shapes, counts = out.strip().splitlines()
    assert shapes == "(1000, 784) float32 (1000,) int32 (500, 784)", out
    assert counts == "[99, 106, 102, 92, 82, 117, 89, 107, 105, 101] bundled", out  # test_data's oracle


def _check_linen(out: str) -> None:
    steps, diff = out.strip().splitlines()
    assert steps == "Batch Renorm updates counted: 3", out
    assert diff.startswith("largest difference from bnjax.layers") and _number_after_colon(diff) < 1e-6, out


def _check_equinox(out: str) -> None:
    assert out.startswith("largest difference from bnjax.layers") and _number_after_colon(out) < 1e-5, out


CHECKS = {
    ("README.md", "def train_step(params, state, opt_state"): _check_research,
    ("README.md", "batch_renorm"): _check_norms_readme,
    ("docs/engine.md", "run_grid"): _check_engine,
    ("docs/norms.md", "ghost_batch_norm(4)"): _check_renorm_ghost,
    ("docs/norms.md", "conv_general_dilated"): _check_conv,
    ("docs/norms.md", "shard_map"): _check_data_parallel,
    ("docs/data.md", "load_bundled"): _check_data,
    ("docs/frameworks.md", "bnn.BatchRenorm"): _check_linen,
    ("docs/frameworks.md", "bnjax.equinox.GhostBatchNorm"): _check_equinox,
}


def _check_for(page: str, block: str):
    found = [check for (p, needle), check in CHECKS.items() if p == page and needle in block]
    assert len(found) == 1, (f"{page}: a python block needs exactly one entry in CHECKS (found {len(found)}); "
                             f"it begins {block[:120]!r}")
    return found[0]


EXAMPLES = [(page.relative_to(ROOT).as_posix(), i, block) for page in PAGES for i, block in enumerate(_blocks(page))]

# Each example costs seconds of JAX compiles. The quick tier (-m "not slow") runs every README example and one
# example per docs page (its cheapest); the others are marked slow.
QUICK_EXAMPLE = {"docs/norms.md": "conv_general_dilated"}


def _is_quick(page: str, index: int, block: str) -> bool:
    if page == "README.md":
        return True
    if page in QUICK_EXAMPLE:
        return QUICK_EXAMPLE[page] in block
    return index == 0


def _example_params():
    return [pytest.param(p, i, b, id=f"{p}[{i}]", marks=() if _is_quick(p, i, b) else pytest.mark.slow)
            for p, i, b in EXAMPLES]


@pytest.mark.parametrize("page,index,block", _example_params())
def test_example_runs_and_prints_what_the_text_says(page, index, block, capsys):
    check = _check_for(page, block)
    exec(compile(block, f"{page} (python block {index})", "exec"), {"__name__": "docs_example"})
    check(capsys.readouterr().out)


def test_every_check_has_its_example():
    for page, needle in CHECKS:
        assert any(p == page and needle in b for p, _, b in EXAMPLES), f"no python block of {page} contains {needle!r}"
    # and every page with examples keeps one in the quick tier
    for page in {p for p, _, _ in EXAMPLES}:
        assert any(_is_quick(p, i, b) for p, i, b in EXAMPLES if p == page), f"{page}: no example in the quick tier"


def test_readme_research_example_comes_first():
    # The first thing a newcomer reads is the layers example (today's tests ran blocks[0] as it).
    assert _check_for("README.md", _blocks(README)[0]) is _check_research


# ------------------------------------------------------------------------------------------------
# Commands, links, tables
# ------------------------------------------------------------------------------------------------


def test_readme_names_the_commands_ci_uses():
    text = _text(README)
    for marker, needle in (("ci:test-command", "python -m pytest"), ("ci:run-command", "python -m experiments.sweep")):
        after = text.split(f"<!-- {marker} -->", 1)[1]
        command = re.search(r"```bash\n(.*?)\n```", after, flags=re.S).group(1)
        assert needle in command and 'pip install -e "' in command
    # CI runs the full suite, not a tier of it.
    test_command = re.search(r"```bash\n(.*?)\n```", text.split("<!-- ci:test-command -->", 1)[1], flags=re.S).group(1)
    runner = test_command.split("python -m pytest", 1)[1].split()
    assert runner in ([], ["-n", "auto", "--dist", "loadfile"]), test_command  # every test, on every core
    assert "pytest-xdist" in (ROOT / "pyproject.toml").read_text()


def test_readme_stays_short():
    assert len(_text(README).splitlines()) <= 160, "README.md is for a newcomer: move detail to docs/"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", _text(path), flags=re.S)  # '#' lines in code blocks are no headings
    return {_slug(m) for m in re.findall(r"^#+ (.*)$", text, flags=re.M)}


def _links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", _text(path), flags=re.S)
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_relative_links_point_to_existing_files(page):
    links = _links(page)
    for link in links:
        if re.match(r"[a-z]+:", link):  # https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        assert path.exists(), f"{page.name}: link {link!r} -> {path} does not exist"
        assert ROOT in path.parents or path == ROOT, f"{page.name}: link {link!r} leaves the repository"
        if anchor and path.suffix == ".md":
            assert anchor in _anchors(path), f"{page.name}: link {link!r}: no heading #{anchor} in {path.name}"


def test_docs_pages_are_linked_from_the_readme():
    linked = {(README.parent / link.partition("#")[0]).resolve() for link in _links(README)}
    for page in PAGES[1:]:
        assert page in linked, f"README.md does not link {page.relative_to(ROOT)}"


def test_experiments_table_names_existing_experiments():
    text = _text(README)
    table = text.split("<!-- experiments:begin -->", 1)[1].split("<!-- experiments:end -->", 1)[0]
    names = re.findall(r"^\| `(\w+)` \|", table, flags=re.M)
    assert names, "no experiment in the README's table"
    for name in names:
        assert (ROOT / "experiments" / f"{name}.py").exists(), f"python -m experiments.{name}: no such module"


# ------------------------------------------------------------------------------------------------
# docs/api.md against the library
# ------------------------------------------------------------------------------------------------

API_MODULES = ("layers", "norms", "model", "convnet", "networks", "train", "grid", "data", "claims", "flax", "equinox")


def _api_sections() -> dict[str, str]:
    parts = re.split(r"^## `bnjax\.(\w+)`$", _text(ROOT / "docs" / "api.md"), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def test_api_page_has_a_section_per_module():
    assert set(API_MODULES) <= set(_api_sections()), sorted(_api_sections())


@pytest.mark.parametrize("name", API_MODULES)
def test_api_page_names_exist(name):
    module = importlib.import_module(f"bnjax.{name}")
    section = _api_sections()[name]
    # The first cell of each table row: one or more `name(...)` (members like `norm.apply` are not module names).
    for cell in re.findall(r"^\| (.*?) \|", section, flags=re.M):
        for fn in re.findall(r"(?<![\w.])(\w+)\(", cell):
            assert hasattr(module, fn), f"docs/api.md names bnjax.{name}.{fn}, which does not exist"


@pytest.mark.parametrize("name", API_MODULES)
def test_every_public_name_is_in_the_api_page(name):
    module = importlib.import_module(f"bnjax.{name}")
    text = _text(ROOT / "docs" / "api.md")
    missing = [n for n in getattr(module, "__all__", ()) if f"`{n}" not in text]
    assert not missing, f"bnjax.{name} exports {missing}, which docs/api.md does not mention"


def test_an_installed_copy_ships_every_package_and_the_data():
    """``pip install .`` (not only ``-e``) must carry every subpackage (``bnjax.norms``, ``bnjax.grid``,
    ``bnjax.data``) and the bundled subset: setuptools' discovery, as pyproject.toml configures it, against the
    folders on disk."""
    setuptools = pytest.importorskip("setuptools")
    text = _text(ROOT / "pyproject.toml")
    include = re.search(r'packages\.find = \{ include = \[([^\]]*)\] \}', text)
    assert include, "pyproject.toml must let setuptools find the packages (a fixed list forgets new ones)"
    patterns = [p.strip().strip('"') for p in include.group(1).split(",") if p.strip()]
    found = set(setuptools.find_packages(str(ROOT), include=patterns))
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "bnjax").rglob("__init__.py")}
    assert on_disk <= found, f"not shipped: {sorted(on_disk - found)}"
    assert not {p for p in found if not p.startswith("bnjax")}, found
    assert '"assets/*.npz"' in text and (ROOT / "bnjax" / "assets" / "mnist_5k.npz").is_file()


def test_no_import_cycle_among_the_modules():
    """The layout the docs describe has no cycle, counting imports inside functions too (a lazy import is still a
    dependency): each module of bnjax/ and experiments/ against the modules it imports."""
    import ast

    files = [*(ROOT / "bnjax").rglob("*.py"), *(ROOT / "experiments").glob("*.py")]
    names = {}
    for path in files:
        parts = path.relative_to(ROOT).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in names.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        # A package importing its own submodules (its public face) is not a cycle.
        graph[name] = {d for d in deps if d in names and d != name and not d.startswith(name + ".")}
    state, cycles = {}, []

    def visit(name, path):
        state[name] = "open"
        for dep in sorted(graph[name]):
            if state.get(dep) == "open":
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles
