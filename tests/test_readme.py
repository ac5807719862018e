"""The README's example runs as written."""

import pathlib
import re


def test_readme_python_examples_run():
    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README.md has no python example"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})


def test_readme_commands_use_flags_the_clis_have():
    """Every ``--flag`` of a ``python -m ard_kernels.X`` / ``torchrun ... -m ard_kernels.X`` command is X's."""
    import importlib

    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        commands += [c for c in block.replace("\\\n", " ").splitlines() if "-m ard_kernels." in c]
    commands += re.findall(r"`(python -m ard_kernels\.[^`]*)`", text)
    checked = set()
    for command in commands:
        module = re.search(r"-m (ard_kernels\.\w+)", command).group(1)
        parser = importlib.import_module(module).build_parser()
        known = {s for action in parser._actions for s in action.option_strings}
        flags = re.findall(r"(?<![\w-])(--[a-z][\w-]*)", command.split(module, 1)[1])
        unknown = [f for f in flags if f not in known]
        assert not unknown, f"README: {command.strip()!r} uses {unknown}, which {module} does not have"
        checked.add(module)
    assert {"ard_kernels.trajectories", "ard_kernels.train", "ard_kernels.samples"} <= checked, checked
