"""The import graph is a DAG from the CLI down to `dept.py`, following the layers of tests/support/import_graph.py, and
the light entry points stay light."""

from __future__ import annotations

import subprocess
import sys

from support.import_graph import LAYERS, REPO_ROOT, cycles, graph, layer, upward


def test_imports_form_no_cycle():
    assert cycles(graph(REPO_ROOT)) == []


def test_imports_only_go_down_the_layers():
    edges = graph(REPO_ROOT)
    assert {layer(m) for m in edges} <= set(LAYERS), "a new module needs a place in import_graph.LAYERS"
    assert upward(edges) == []


def test_the_dept_module_knows_nothing_of_the_rest():
    assert graph(REPO_ROOT)["pipeline.dept"] <= {"pipeline.config", "pipeline.errors"}


def test_only_the_engine_names_deepspeed():
    named = sorted(
        str(p.relative_to(REPO_ROOT))
        for p in (REPO_ROOT / "pipeline").rglob("*.py")
        if "deepspeed" in p.read_text().lower() and p.name != "engine.py"
    )
    # documentation words are fine (the launcher, "DeepSpeed config"): imports and attributes are not
    for path in named:
        text = (REPO_ROOT / path).read_text()
        assert "import deepspeed" not in text and "from deepspeed" not in text, path
        for internal in ("ds_numel", "ds_tensor", "ds_id", "GatheredParameters", "HfDeepSpeedConfig", "zero.Init"):
            assert internal not in text, (path, internal)


def test_importing_the_cli_and_the_recipe_schema_does_not_import_torch():
    code = (
        "import sys; import pipeline.cli, pipeline.recipe, pipeline.config, pipeline.tasks; "
        "bad = [m for m in ('torch', 'deepspeed', 'transformers', 'datasets', 'mlflow') if m in sys.modules]; "
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_deepspeed_loads_without_importing_mlflow_and_mlflow_still_imports_after():
    """DeepSpeed's autotuner imports mlflow when DeepSpeed is imported (1.3 s of each rank's start, #24): the engine
    hides it during that import only, so the autotuner says it has none and our tracking still imports it."""
    code = (
        "import sys; from pipeline import engine; engine.load_deepspeed(); "
        "assert 'deepspeed' in sys.modules and 'mlflow' not in sys.modules, sorted(sys.modules); "
        "from deepspeed.autotuning import autotuner; assert autotuner.has_mlflow is False; "
        "assert engine.load_deepspeed() is sys.modules['deepspeed']; "
        "import mlflow; assert mlflow.__version__"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
