"""Editor and shell support: every shipped recipe names the JSON schema for the YAML language
server, Typer's completion is offered, and the light commands (estimate, init, report) stay free
of torch (and estimate of matplotlib) so they answer at once."""

import json
import subprocess
import sys

from typer.testing import CliRunner

from qlora_cli.cli import app
from qlora_cli.recipe.schema import recipe_schema
from tests.conftest import CONFIGS, ROOT


def test_every_config_starts_with_the_schema_comment_pointing_at_the_checked_in_schema():
    assert CONFIGS
    for config in CONFIGS:
        first = config.read_text().splitlines()[0]
        assert first == "# yaml-language-server: $schema=../docs/recipe.schema.json", config.name
        schema = (config.parent / first.split("=", 1)[1]).resolve()
        assert json.loads(schema.read_text()) == recipe_schema()


def test_shell_completion_is_offered():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0 and "--install-completion" in result.output and "--show-completion" in result.output
    for command in ("report", "init"):
        assert command in result.output


def test_estimate_init_and_report_import_no_torch_and_estimate_no_matplotlib(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"global_step": 1, "max_steps": 1, "last_loss": 1.0, "log_history": [{"loss": 1.0, "step": 1}]}))
    code = (
        "import sys; from typer.testing import CliRunner; from qlora_cli.cli import app; heavy = ('torch', 'transformers', 'datasets', 'peft', 'bitsandbytes'); "
        f"r = CliRunner().invoke(app, ['estimate', {str(ROOT / 'configs/llama-3.1-8b-qlora.yaml')!r}, '--gpu', 'RTX4090', '--json']); "
        "assert r.exit_code == 0, r.output; print(sorted(m for m in heavy + ('matplotlib',) if m in sys.modules)); "
        f"r = CliRunner().invoke(app, ['init', '--model', 'Qwen3-8B', '--gpu', 'L4', '--output', {str(tmp_path / 'r.yaml')!r}]); "
        f"assert r.exit_code == 0, r.output; r = CliRunner().invoke(app, ['report', {str(run)!r}, '--output', {str(tmp_path / 'r.png')!r}]); "
        "assert r.exit_code == 0, r.output; print(sorted(m for m in heavy if m in sys.modules))"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.split() == ["[]", "[]"]
    assert (tmp_path / "r.png").is_file() and (tmp_path / "r.yaml").is_file()
