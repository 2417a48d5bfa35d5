"""The README's research-code example runs exactly as written, and its commands are the ones CI runs."""

import re
from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_readme_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks, "no python example in README.md"
    exec(compile(blocks[0], "README.md", "exec"), {"__name__": "readme_example"})
    out = capsys.readouterr().out
    assert out.startswith("loss ") and "eval accuracy" in out


def test_readme_grid_engine_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    engine = [b for b in blocks if "run_grid" in b]
    assert engine, "no grid-engine example in README.md"
    exec(compile(engine[0], "README.md", "exec"), {"__name__": "readme_example"})
    out = capsys.readouterr().out
    assert out.startswith("(2, 4, 2, 4) "), out  # [seeds, learning rates, weight scales, records]


def test_readme_names_the_commands_ci_uses():
    for marker, needle in (("ci:test-command", "python -m pytest"), ("ci:run-command", "python -m experiments.sweep")):
        after = README.split(f"<!-- {marker} -->", 1)[1]
        command = re.search(r"```bash\n(.*?)\n```", after, flags=re.S).group(1)
        assert needle in command and 'pip install -e "' in command


def test_readme_norms_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    norms = [b for b in blocks if "batch_renorm" in b]
    assert norms, "no norms-as-values example in README.md"
    exec(compile(norms[0], "README.md", "exec"), {"__name__": "readme_example"})
    out = capsys.readouterr().out
    relative = float(out.rsplit(":", 1)[1])
    assert out.startswith("largest difference") and relative < 1e-5, out
