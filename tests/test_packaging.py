"""The package as a user installs it: a wheel holds every module, the prompts, the schemas and the
card template, and a fresh environment renders a prompt and validates a record from it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # built from a copy of what a source distribution holds: building in place would leave
    # build/ and *.egg-info in the checkout
    src = out / "src"
    for rel in ("pipeline", "flows", "trainer", "prompts", "schemas", "models"):
        shutil.copytree(REPO / rel, src / rel, ignore=shutil.ignore_patterns("__pycache__"))
    for rel in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / rel, src / rel)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(out / "dist"), str(src)], check=True, capture_output=True)
    [built] = (out / "dist").glob("avar-*.whl")
    return built


def test_the_wheel_holds_every_module_and_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {str(p.relative_to(REPO)) for pkg in ("pipeline", "flows", "trainer")
                for p in (REPO / pkg).rglob("*.py")}
    expected |= {f"pipeline/resources/prompts/{p.relative_to(REPO / 'prompts')}"
                 for p in (REPO / "prompts").rglob("*") if p.suffix in (".j2", ".jinja", ".md")}
    expected |= {f"pipeline/resources/schemas/{p.name}" for p in (REPO / "schemas").glob("*.json")}
    expected |= {"pipeline/publishing/templates/data_card.md.j2"}
    expected |= {f"pipeline/resources/models/{p.relative_to(REPO / 'models')}" for p in (REPO / "models").rglob("*")
                 if p.is_file() and "checkpoints" not in p.parts and p.suffix in (".json", ".safetensors", ".jinja", ".txt")}
    assert any(name.endswith("tiny-shapes/model.safetensors") for name in expected)  # the learned reference model
    assert expected - names == set()
    assert not [n for n in names if n.startswith(("tests/", "bench/"))]


def test_a_fresh_environment_renders_a_prompt_and_validates_a_record(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True)
    # dependencies (jinja2, jsonschema, ...) from this environment, without its editable avar
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    code = textwrap.dedent("""
        import hashlib, pipeline
        from pipeline.records import validate
        from pipeline.synthesis.prompts import load_template
        messages = load_template("describe").render(question="What is x?", choices=None,
                                                   answer_type="number", n_images=1)
        png = bytes.fromhex("89504e470d0a1a0a")
        validate("seed", {"id": "0" * 32, "images": [{"bytes": png, "sha256": hashlib.sha256(png).hexdigest(),
                 "width": 1, "height": 1, "format": "PNG", "path": None}], "question": "What is x?",
                 "gold_answer": "2", "answer_type": "number", "source": "unit"})
        print(pipeline.__file__)
        print(messages[1]["content"][0]["text"].splitlines()[0])
    """)
    out = subprocess.run([str(python), "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    where, heading = out.stdout.split("\n")[:2]
    assert where.startswith(str(venv)), where  # the installed copy, not the checkout
    assert heading == "## Task: describe"


def _requirements() -> tuple[list[str], dict[str, list[str]]]:
    import tomllib
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return project["dependencies"], project["optional-dependencies"]


def _name(requirement: str) -> str:
    return requirement.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].strip().lower()


def test_the_base_install_is_a_training_environment_without_prefect():
    base, extras = _requirements()
    names = {_name(r) for r in base}
    assert not names & {"prefect", "prefect-ray", "ray", "vllm"}, names  # vLLM's fastapi pin
    assert "prefect" in {_name(r) for r in extras["synth"]}
    # no requirement pins torch to one version: installing never swaps an installed torch
    every = base + [r for group in extras.values() for r in group]
    assert not [r for r in every if _name(r) == "torch" and "==" in r]
    # and the training side imports with Prefect unimportable
    code = ("import sys; sys.modules['prefect'] = None\n"
            "import trainer.sft, trainer.rl, trainer.eval, pipeline.vas.stage, pipeline.lens\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


def test_an_uninstalled_checkout_reads_prompts_and_schemas_where_they_are(tmp_path):
    """A machine with its own torch/transformers runs ``python -m bench.gpu`` from a copy of the
    checkout without installing it: no package-dir mapping, so the folders are read in place."""
    copy = tmp_path / "checkout"
    shutil.copytree(REPO / "pipeline", copy / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    for rel in ("prompts", "schemas"):
        shutil.copytree(REPO / rel, copy / rel)
    code = ("from pipeline.resources import prompts_dir, schemas_dir\n"
            "print(prompts_dir()); print(schemas_dir())\n"
            "print(len(list(prompts_dir().glob('*.j2'))), len(list(schemas_dir().glob('*.json'))))")
    # -S: no site-packages .pth files, so the editable install's import hook is not there
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=copy, capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    prompts, schemas, counts = out.stdout.splitlines()
    assert (Path(prompts), Path(schemas)) == (copy / "prompts", copy / "schemas")
    assert counts == f"{len(list((REPO / 'prompts').glob('*.j2')))} {len(list((REPO / 'schemas').glob('*.json')))}"
    (copy / "prompts").rename(copy / "elsewhere")
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=copy, capture_output=True, text=True,
                         check=False)
    assert out.returncode != 0 and "not installed and no prompts/ folder" in out.stderr
