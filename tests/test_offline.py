"""Importing stepsal changes no global state; its loaders stay offline without the user's variables."""

import json
import os
import subprocess
import sys

import stepsal
from stepsal._offline import OFFLINE_DEFAULTS


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in OFFLINE_DEFAULTS}


def test_import_stepsal_leaves_the_environment_unchanged():
    """Importing the package and every public name (which imports the modules behind them) sets nothing."""
    script = ("import json, os; before = dict(os.environ); import stepsal\n"
              "for name in stepsal.__all__: getattr(stepsal, name)\n"
              "import stepsal.cli, stepsal.studies.study, stepsal.vis.report\n"
              "after = dict(os.environ)\n"
              "print(json.dumps({k: [before.get(k), after.get(k)] for k in set(before) | set(after) "
              "if before.get(k) != after.get(k)}))")
    out = subprocess.run([sys.executable, "-c", script], env=clean_env(), capture_output=True, text=True,
                         timeout=300, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {}


def test_the_cli_sets_offline_defaults_for_its_own_process():
    script = ("import os, sys; import stepsal.cli; stepsal.cli.main(['--help'])")
    script = ("import os, stepsal.cli\n"
              "try: stepsal.cli.main(['--help'])\n"
              "except SystemExit: pass\n"
              "print(os.environ.get('HF_HUB_OFFLINE'), os.environ.get('TRANSFORMERS_OFFLINE'))")
    out = subprocess.run([sys.executable, "-c", script], env=clean_env(), capture_output=True, text=True,
                         timeout=300, check=True)
    assert out.stdout.split()[-2:] == ["1", "1"]


def test_a_saved_folder_loads_without_the_offline_variables(hf_models, tokenizer, tmp_path):
    """No HF_HUB_OFFLINE in the environment: load_model still never asks the hub (local_files_only)."""
    folder = tmp_path / "tiny-model"
    hf_models["llama"].save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    script = ("import sys, stepsal; m = stepsal.load_model(sys.argv[1], backend='bridge'); "
              "print(type(m).__name__, m.cfg.n_layers)")
    env = {**clean_env(), "HF_HUB_ETAG_TIMEOUT": "1", "HF_HUB_DOWNLOAD_TIMEOUT": "1"}
    out = subprocess.run([sys.executable, "-c", script, str(folder)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["TransformerBridge", str(hf_models["llama"].config.num_hidden_layers)]


def test_a_hub_name_is_refused_without_allow_download_even_when_online():
    import pytest

    env_before = os.environ.pop("HF_HUB_OFFLINE")
    try:
        with pytest.raises(FileNotFoundError, match="downloads are off"):
            stepsal.load_model("someone/some-model")
    finally:
        os.environ["HF_HUB_OFFLINE"] = env_before
