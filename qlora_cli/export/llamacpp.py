"""llama.cpp itself, in process: the libllama that PyPI's `llama-cpp-python` builds from its
vendored llama.cpp sources (scripts/setup_llamacpp.sh builds it once and caches the wheel),
called through its C API. It loads a GGUF (and LoRA GGUFs) as llama.cpp does, tokenizes, renders
the file's own chat template, decodes greedily, returns logits, and quantizes with llama.cpp's
own quantizer (k-quants, with an importance matrix).

Without it `available()` says why, and the checks that need it say so instead of running.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from qlora_cli.errors import ModelError

INSTALL_HINT = "run scripts/setup_llamacpp.sh (scripts/setup.sh does)"
# llama_ftype values of llama.h: what `llama-quantize MODEL OUT TYPE` writes for each name.
QUANT_FTYPES = {"q4_0": 2, "q8_0": 7, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}

_state: dict = {}


def _load():
    """The llama_cpp ctypes module, its log sent nowhere; raises ImportError / OSError without it."""
    if "lib" not in _state:
        import llama_cpp

        # llama.cpp logs every load to stderr: its errors are kept to name in ours, the rest dropped.
        # The callback object must outlive the library's use of it.
        def keep_errors(level, text, data):
            if level == 4 and text:  # GGML_LOG_LEVEL_ERROR
                _state["errors"].append(text.decode("utf-8", "replace").strip())
                del _state["errors"][:-4]

        _state["errors"] = []
        _state["log"] = llama_cpp.llama_log_callback(keep_errors)
        llama_cpp.llama_log_set(_state["log"], ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _state["lib"] = llama_cpp
    return _state["lib"]


def last_error() -> str:
    """llama.cpp's last logged errors, for a message that says why it refused."""
    errors = [line for line in _state.get("errors", []) if line]
    _state.get("errors", []).clear()
    return f" (llama.cpp: {' '.join(errors)[-300:]})" if errors else ""


def available() -> tuple[bool, str]:
    """(whether llama.cpp can run here, the one-line reason when it cannot)."""
    try:
        _load()
    except (ImportError, OSError, RuntimeError) as exc:
        return False, f"llama.cpp is not installed here ({type(exc).__name__}: {str(exc)[:120]}); {INSTALL_HINT}"
    return True, ""


def version() -> str:
    try:
        lib = _load()
    except (ImportError, OSError, RuntimeError):
        return "absent"
    return f"llama-cpp-python {lib.__version__ if hasattr(lib, '__version__') else ''}".strip()


def threads() -> int:
    """QLORA_LLAMACPP_THREADS, else as many as torch computes with in this process (the test
    suite's workers set 1): llama.cpp's OpenMP threads spin while they wait, and two of them on a
    core another process is using measured 6x slower than one."""
    return max(1, int(os.environ.get("QLORA_LLAMACPP_THREADS") or torch.get_num_threads()))


class Model:
    """One GGUF loaded by llama.cpp, optionally with LoRA GGUFs applied at their scales."""

    def __init__(self, path: Path, n_ctx: int = 2048, loras: Sequence[tuple[Path, float]] = ()):
        self.lib = lib = _load()
        self.model = self.ctx = None
        params = lib.llama_model_default_params()
        params.n_gpu_layers = 0
        self.model = lib.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise ModelError(f"llama.cpp cannot load {path}: it rejects the file{last_error()}")
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self.n_ctx = n_ctx
        context = lib.llama_context_default_params()
        context.n_ctx = context.n_batch = context.n_ubatch = n_ctx
        context.n_threads = context.n_threads_batch = threads()
        context.no_perf = True
        self.ctx = lib.llama_init_from_model(self.model, context)
        if not self.ctx:
            self.close()
            raise ModelError(f"llama.cpp cannot make a context for {path}")
        adapters = []
        for lora, _ in loras:
            adapter = lib.llama_adapter_lora_init(self.model, str(lora).encode())
            if not adapter:
                self.close()
                raise ModelError(f"llama.cpp rejects the LoRA file {lora} for {path}{last_error()}")
            adapters.append(adapter)
        if adapters:
            handles = (lib.llama_adapter_lora_p_ctypes * len(adapters))(*adapters)
            scales = (ctypes.c_float * len(adapters))(*[float(scale) for _, scale in loras])
            if lib.llama_set_adapters_lora(self.ctx, handles, len(adapters), scales) != 0:
                self.close()
                raise ModelError(f"llama.cpp cannot apply the LoRA files to {path}")

    def close(self) -> None:
        if self.ctx:
            self.lib.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            self.lib.llama_model_free(self.model)  # frees its adapters too
            self.model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def metadata(self, key: str) -> Optional[str]:
        buf = ctypes.create_string_buffer(1 << 16)
        length = self.lib.llama_model_meta_val_str(self.model, key.encode(), buf, 1 << 16)
        return None if length < 0 else buf.value.decode("utf-8", "replace")

    def tokenize(self, text: str, add_special: bool, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        size = len(data) + 8
        tokens = (ctypes.c_int32 * size)()
        count = self.lib.llama_tokenize(self.vocab, data, len(data), tokens, size, add_special, parse_special)
        if count < 0:
            size = -count
            tokens = (ctypes.c_int32 * size)()
            count = self.lib.llama_tokenize(self.vocab, data, len(data), tokens, size, add_special, parse_special)
        return list(tokens[:count])

    def piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(256)
        length = self.lib.llama_token_to_piece(self.vocab, token, buf, 256, 0, True)
        return buf.raw[:max(length, 0)]

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.piece(token) for token in tokens).decode("utf-8", "replace")

    def is_end_of_generation(self, token: int) -> bool:
        return bool(self.lib.llama_vocab_is_eog(self.vocab, token))

    def chat_template(self) -> Optional[str]:
        template = self.lib.llama_model_chat_template(self.model, None)
        return template.decode("utf-8") if template else None

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as llama.cpp renders it with the file's own chat template (its built-in
        renderer for the template's family, as llama-cli and llama-server without --jinja do)."""
        template = self.lib.llama_model_chat_template(self.model, None)
        if not template:
            raise ModelError("the GGUF carries no chat template (tokenizer.chat_template)")
        chat = (self.lib.llama_chat_message * len(messages))()
        for index, message in enumerate(messages):
            chat[index].role, chat[index].content = message["role"].encode(), message["content"].encode()
        size = 4 * sum(len(message["content"]) for message in messages) + 1024
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            length = self.lib.llama_chat_apply_template(template, chat, len(messages), add_generation_prompt, buf, size)
            if length < 0:
                raise ModelError("llama.cpp does not recognise the GGUF's chat template (llama_chat_apply_template)")
            if length <= size:
                return buf.raw[:length].decode("utf-8")
            size = length + 1
        raise ModelError("llama.cpp's chat template rendering did not settle on a length")

    def _decode(self, tokens: Sequence[int], start: int, all_logits: bool) -> None:
        batch = self.lib.llama_batch_init(len(tokens), 0, 1)
        try:
            for index, token in enumerate(tokens):
                batch.token[index] = token
                batch.pos[index] = start + index
                batch.n_seq_id[index] = 1
                batch.seq_id[index][0] = 0
                batch.logits[index] = 1 if all_logits or index == len(tokens) - 1 else 0
            batch.n_tokens = len(tokens)
            if self.lib.llama_decode(self.ctx, batch) != 0:
                raise ModelError("llama.cpp failed to decode a batch")
        finally:
            self.lib.llama_batch_free(batch)

    def _logits_row(self, index: int) -> np.ndarray:
        row = self.lib.llama_get_logits_ith(self.ctx, index)
        return np.ctypeslib.as_array(row, shape=(self.n_vocab,)).copy()

    def reset(self) -> None:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """(len(tokens), vocab) logits of one forward pass from an empty cache."""
        if len(tokens) > self.n_ctx:
            raise ModelError(f"{len(tokens)} tokens do not fit llama.cpp's context of {self.n_ctx}")
        self.reset()
        self._decode(tokens, 0, all_logits=True)
        return np.stack([self._logits_row(index) for index in range(len(tokens))])

    def greedy(self, prompt: Sequence[int], max_new_tokens: int) -> tuple[list[int], bool]:
        """(new tokens, whether generation ended at an end-of-generation token by itself); the
        end token itself is not returned."""
        self.reset()
        self._decode(prompt, 0, all_logits=False)
        generated: list[int] = []
        position = len(prompt)
        while len(generated) < max_new_tokens and position < self.n_ctx:
            token = int(np.argmax(self._logits_row(-1)))
            if self.is_end_of_generation(token):
                return generated, True
            generated.append(token)
            self._decode([token], position, all_logits=False)
            position += 1
        return generated, False


def quantize(source: Path, target: Path, gguf_type: str, imatrix: Optional[dict[str, np.ndarray]] = None) -> None:
    """llama.cpp's own quantizer (what `llama-quantize [--imatrix] SOURCE TARGET TYPE` runs) from an
    f16/bf16/f32 GGUF; `imatrix` maps GGUF weight names to per-input-column mean squared activations."""
    lib = _load()
    params = lib.llama_model_quantize_default_params()
    params.ftype = QUANT_FTYPES[gguf_type]
    params.nthread = threads()
    if imatrix:
        entries = (lib.llama_model_imatrix_data * (len(imatrix) + 1))()  # zero-filled: the last is the end marker
        arrays = [np.ascontiguousarray(values, dtype=np.float32) for values in imatrix.values()]
        for entry, name, values in zip(entries, imatrix, arrays):
            entry.name = name.encode()
            entry.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entry.size = values.size
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(lib.llama_model_imatrix_data))
    status = lib.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if status != 0:
        with contextlib.suppress(FileNotFoundError):
            target.unlink()
        raise ModelError(f"llama.cpp's quantizer failed ({status}) making {gguf_type} from {source.name}{last_error()}")
