"""Shared fixtures and helpers: a tiny word-level tokenizer with a ChatML template and a tiny
random Llama saved as a Hugging Face folder, so unit tests run in seconds with exact
expectations; the real demo model (SmolLM2-135M, DEMO_MODEL) is loaded by tests/integration only.

Helpers used by more than one test module live here, as plain functions imported with
`from tests.conftest import ...` (a test module never imports from another test module);
tests/unit/tiny_run.py builds finished run directories without training.

Under pytest-xdist (scripts/test.sh runs `-n 2 --dist loadgroup`) see "running under pytest-xdist"
at the end: one torch thread per worker, test groups, tests that run alone.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

import pytest

from qlora_cli.data.formats import IGNORE_INDEX

ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))  # the shipped recipes

WORDS = (
    "user assistant system the a is of to and in what which topic sentence about answer yes no sports cooking weather music technology "
    "hello world cat dog runs jumps red blue green one two three four five six seven eight nine ten "
    "below instruction describes task write response that appropriately completes request ### Instruction: Response: "
    "Input: paired with an input provides further context . , ? !"
).split()
SPECIALS = ["<unk>", "<s>", "<|im_end|>", "<|im_start|>"]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' + message['content'] + ' <|im_end|> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant ' }}{% endif %}"
)


def build_tiny_tokenizer():
    """Word-level: every word of WORDS and every special token is exactly one id."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="<|im_end|>", pad_token="<|im_end|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tokenizer.chat_template = CHATML
    return tokenizer


def build_tiny_llama(vocab_size: int, seed: int = 0, hidden_size: int = 64):
    """A 2-layer random Llama; hidden 64 so bitsandbytes' 64-element blocks divide every weight."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=False,
        # With the default 0.02 the output head can only reach logits of about +-1.3 after the
        # final norm, so no adapter could ever make a confident prediction.
        initializer_range=0.2,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny Llama + tokenizer folder, loadable with from_pretrained."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_llama(len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def load_script(name: str):
    """scripts/<name>.py imported as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_recipe(folder: Path, recipe: dict, name: str = "recipe.yaml") -> Path:
    """`recipe` (a dict) as YAML in folder/name; returns the file's path."""
    import yaml

    path = folder / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def recipe_from(recipe_dict: dict, **sections):
    """The validated Recipe of `recipe_dict` with each section updated: recipe_from(d, train={"max_steps": 3})."""
    from qlora_cli.recipe.loader import validate_recipe

    data = json.loads(json.dumps(recipe_dict))
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return validate_recipe(data)


def losses(output_dir: Path) -> dict[int, float]:
    """{step: training loss} of every logged step of a finished run directory, in order."""
    history = json.loads((output_dir / "metrics.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


# ---- the command line in this process ---------------------------------------------------------


def invoke(*args):
    """`qlora ARGS` through Typer's test runner (each argument str()-ed); returns the Click Result."""
    from typer.testing import CliRunner

    from qlora_cli.cli import app

    return CliRunner().invoke(app, [str(arg) for arg in args])


def one_line_error(result, code: int, ignoring: tuple[str, ...] = ()) -> str:
    """Assert `result` exited with `code` after exactly one stderr line, starting "error:", and no
    traceback; returns that line. Lines starting with one of `ignoring` (training's progress lines:
    TRAINING_PROGRESS) are not counted."""
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip() and not (ignoring and line.startswith(ignoring))]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return lines[0]


TRAINING_PROGRESS = ("step ", "resuming from")


# ---- batches for the collators and the loss kernels ------------------------------------------

PAD_ID = 2
TOKEN_ROWS = [
    {"input_ids": [5, 6, 7, 8, 2], "labels": [IGNORE_INDEX, IGNORE_INDEX, 7, 8, 2]},
    {"input_ids": [9, 2], "labels": [IGNORE_INDEX, 2]},
    {"input_ids": [10, 11, 12], "labels": [10, 11, 12]},
]


# ---- what autograd saves, against the activation formula (tests of the estimate) -------------

CPU_DROPOUT_MASK_EXTRA = 3  # bytes per LoRA input element: fp32 mask on CPU vs bool mask on CUDA


def measured_saved_bytes(model, batch) -> int:
    """Bytes of the distinct non-parameter storages autograd saves during one forward pass."""
    import torch

    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(**batch)
    return sum(storages.values())


def random_batch(plan, vocab_size: int) -> dict:
    """A batch of random ids shaped as `plan` (an estimate Plan) says, packed or padded."""
    import torch

    ids = torch.randint(0, vocab_size, (plan.micro_batch, plan.seq_len), generator=torch.Generator().manual_seed(0))
    if plan.packing:
        positions = torch.arange(plan.seq_len).repeat(plan.micro_batch).reshape(1, -1)
        return {"input_ids": ids.reshape(1, -1), "labels": ids.reshape(1, -1), "position_ids": positions}
    return {"input_ids": ids, "labels": ids}


def expected_cpu_bytes(arch, plan) -> int:
    """The formula's saved bytes without checkpointing, plus the loss's saved fp32 log_softmax."""
    from qlora_cli.estimate.activations import activation_parts
    from qlora_cli.estimate.memory import resolve_targets

    saved = activation_parts(arch, plan)["kept until backward"] + 4 * plan.tokens * arch.vocab_size
    if plan.lora_dropout > 0:  # every mask the formula counts at 1 byte is 4 bytes on CPU
        linears, _, _ = resolve_targets(arch, plan.target_modules)
        masked = arch.num_layers * sum(linear.in_features for linear in linears) - sum(linear.in_features for linear in linears if linear.role == "attn_in")
        saved += CPU_DROPOUT_MASK_EXTRA * plan.tokens * masked
    return saved


@pytest.fixture
def recipe_dict(tiny_model_dir, tmp_path):
    """A minimal valid recipe (as a dict) on the tiny model with a small chat dataset."""
    rows = [
        {"messages": [{"role": "user", "content": f"what topic is {word} ?"}, {"role": "assistant", "content": topic}]}
        for word, topic in [("cat", "music"), ("dog", "sports"), ("red", "weather"), ("blue", "cooking")] * 4
    ]
    train_file = write_jsonl(tmp_path / "train.jsonl", rows)
    return {
        "model": {"path": str(tiny_model_dir)},
        "quantization": {"bits": 16},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": str(train_file), "format": "chat", "max_seq_len": 64},
        "train": {"max_steps": 2, "micro_batch_size": 4, "logging_steps": 1, "save_steps": 1, "optimizer": "adamw_torch"},
        "output": {"dir": str(tmp_path / "run")},
    }


# ---- running under pytest-xdist ---------------------------------------------------------------
#
# scripts/test.sh runs `-n 2 --dist loadgroup`. Each worker runs torch on one thread, and so do the
# commands its tests start. The tests of one `xdist_group` run on one worker, one after another:
# the readers of the session's demo run (marked here, so it is trained once) and the tests that
# start several processes. pytest 9.2 ignores pytest-xdist 3.8's way of passing a test's group to
# the scheduler (an "@group" suffix on its node id, pytest-xdist issue #1386), so the workers write
# the groups they collected to a file that the scheduler below reads. A test marked `alone` runs
# while no other test runs on any worker, and no two tests of one group ever run at once, whichever
# scheduler is used (see _turn).


def xdist_worker() -> str | None:
    """This process's pytest-xdist worker name ("gw0"), or None outside xdist."""
    return os.environ.get("PYTEST_XDIST_WORKER")


def _run_file(uid: str, suffix: str) -> Path:
    """A file of this xdist run, shared by the controller and its workers."""
    return Path(tempfile.gettempdir()) / f"qlora-tests-{uid}.{suffix}"


def pytest_configure(config):
    config.addinivalue_line("markers", "alone: under pytest-xdist, runs while no other test runs on any worker (signal and kill timing)")
    config.addinivalue_line("markers", "xdist_group(name): under pytest-xdist, the tests of one group run on one worker, one after another")
    if xdist_worker():
        threads = os.environ.get("QLORA_TEST_THREADS", "1")
        os.environ["OMP_NUM_THREADS"] = threads
        import torch

        torch.set_num_threads(int(threads))
    elif getattr(config.option, "numprocesses", None) and getattr(config.option, "testrunuid", "") is None:
        import uuid

        config.option.testrunuid = uuid.uuid4().hex  # known here and (as PYTEST_XDIST_TESTRUNUID) in the workers


def pytest_unconfigure(config):
    uid = getattr(config.option, "testrunuid", None)
    if uid and not xdist_worker():
        for leftover in _run_file(uid, "x").parent.glob(f"qlora-tests-{uid}.*"):
            leftover.unlink(missing_ok=True)


def _groups(item) -> list[str]:
    return sorted({str(mark.args[0] if mark.args else mark.kwargs.get("name", "default")) for mark in item.iter_markers("xdist_group")})


@pytest.hookimpl(tryfirst=True)  # the groups are marked before pytest-xdist looks for them
def pytest_collection_modifyitems(config, items):
    import torch

    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_demo = pytest.mark.skip(reason=f"demo model missing: run `qlora demo-model` (expects {DEMO_MODEL})")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "integration" in item.keywords and not DEMO_MODEL.is_dir() and os.environ.get("QLORA_ALLOW_MISSING_DEMO"):
            item.add_marker(skip_demo)
        if "demo_run" in getattr(item, "fixturenames", ()):
            # The session's demo run is trained once per worker that needs it: keep its readers on one.
            item.add_marker(pytest.mark.xdist_group("demo_run"))
        if item.get_closest_marker("alone"):
            item.add_marker(pytest.mark.xdist_group("alone"))  # scheduled last: see pytest_xdist_make_scheduler
    worker = xdist_worker()
    if worker:
        groups = {item.nodeid: "_".join(names) for item in items if (names := _groups(item))}
        path = _run_file(os.environ["PYTEST_XDIST_TESTRUNUID"], f"groups-{worker}.json")
        path.with_suffix(".tmp").write_text(json.dumps(groups))
        path.with_suffix(".tmp").replace(path)


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: unknown without it
def pytest_xdist_make_scheduler(config, log):
    """--dist loadgroup, with the groups the workers wrote (a worker writes them before it reports
    its collection, and the scheduler splits the tests once every worker has reported). The largest
    groups go first (xdist's order); the `alone` tests go last, when the other worker has only a
    few short unit tests left to finish before they may start."""
    if config.getoption("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class CollectedGroups(LoadGroupScheduling):
        groups: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.groups is None:
                written = sorted(_run_file(config.option.testrunuid, "x").parent.glob(f"qlora-tests-{config.option.testrunuid}.groups-*.json"))
                self.groups = json.loads(written[0].read_text()) if written else {}
            return self.groups.get(nodeid) or super()._split_scope(nodeid)

        def _assign_work_unit(self, node) -> None:
            if "alone" in self.workqueue:
                self.workqueue.move_to_end("alone")
            super()._assign_work_unit(node)

    return CollectedGroups(config, log)


@contextlib.contextmanager
def _turn(item):
    """Under xdist: a shared lock around every test and an exclusive one around `alone` tests (a
    waiting exclusive test holds the gate, so the other worker's next tests queue behind it instead
    of starving it); then one lock per xdist_group the test belongs to."""
    import fcntl

    uid = os.environ.get("PYTEST_XDIST_TESTRUNUID", "run")
    with contextlib.ExitStack() as held:
        gate = held.enter_context(open(_run_file(uid, "gate"), "a"))
        lock = held.enter_context(open(_run_file(uid, "lock"), "a"))
        fcntl.flock(gate, fcntl.LOCK_EX)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if item.get_closest_marker("alone") else fcntl.LOCK_SH)
        finally:
            fcntl.flock(gate, fcntl.LOCK_UN)
        held.callback(fcntl.flock, lock, fcntl.LOCK_UN)
        for name in _groups(item):
            group = held.enter_context(open(_run_file(uid, f"group-{name}"), "a"))
            fcntl.flock(group, fcntl.LOCK_EX)
            held.callback(fcntl.flock, group, fcntl.LOCK_UN)
        yield


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Setup (session and module fixtures included), call and teardown of each test inside its turn."""
    if not xdist_worker():
        return (yield)
    with _turn(item):
        return (yield)
