"""environment.yml (conda) and pyproject.toml (pip) must list the same dependencies."""
import tomllib

import yaml

from pruning_utils.chapters import ROOT


def test_environment_yml_matches_pyproject():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_lists = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_lists) == 1
    assert sorted(pip_lists[0]) == sorted(deps)


def test_torch_pair_is_pinned_together():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {d.split("==")[0]: d.split("==")[1] for d in deps if "==" in d}
    assert pins.get("torch") and pins.get("torchvision"), "torch and torchvision must come as a pinned pair"
