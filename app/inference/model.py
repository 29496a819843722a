"""Load a causal LM folder (HF format) and describe it as a ModelInfo."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from . import cpu, fastllama, fbgemm, int8, native, onednn
from .threads import in_passing_thread
from .types import ModelInfo
from .weights import read_marker, weights_version

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EngineOptions:
    """How the model is run; the INFERQL_* settings of the same names (see app/settings.py)."""

    dtype: str = "auto"                # auto | float32 | bfloat16 | float16: the fast path's weights
    fast_path: str = "auto"            # auto: Llama-family models through fastllama.py; off: HF forward
    prefill_chunk: int = 128           # prompt tokens fed per step while other requests decode
    stream_interval_ms: int = 50       # tokens handed to the loop at most this often (requests.Outbox); 0 = each step
    stream_messages_per_s: int = 160   # ... stretched to running requests / this when that is longer (0 = off)
    prefix_cache_tokens: int = 4096    # KV of recent prompt prefixes kept for reuse (0 = off)
    int8_small_batch: str = "auto"     # auto | on | off: int8 weight copies for decode steps of few rows (int8.py)
    packed_weights: str = "auto"       # auto | off: matrices prepacked for oneDNN on CPU (onednn.py)
    fp16_matrices: str = "auto"        # auto | on | off: a float32 model's matrices in float16 for fbgemm (fbgemm.py)
    decode_attention: str = "auto"     # auto | sdpa | matmuls: a CPU decode step's attention (fastllama.py)
    native_step: str = "auto"          # auto | off: the int8 copies' decode steps in one native call (native.py)

    @classmethod
    def from_settings(cls, settings) -> EngineOptions:
        """From any object with attributes of these names (the app's Settings)."""
        return cls(**{f: getattr(settings, f) for f in cls.__dataclass_fields__ if hasattr(settings, f)})


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    """The dtype of the weights on the fast path: `auto` takes 16 bits where the hardware has
    native support (CUDA; a CPU with AVX512-BF16 or AMX), float32 elsewhere."""
    if setting != "auto":
        return DTYPES[setting]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu.native_bf16() else torch.float32


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    info: ModelInfo
    eos_ids: frozenset[int]
    device: torch.device
    options: EngineOptions = field(default_factory=EngineOptions)
    dtype: torch.dtype = torch.float32  # of the weights the engine computes with
    _token_texts: dict[int, str] = field(default_factory=dict)
    _fast: fastllama.FastWeights | None = field(default=None, init=False, repr=False)
    _user_frame: tuple[str, str] | None = field(default=None, init=False, repr=False)
    _backend: object | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._user_frame = user_turn_frame(self.tokenizer)
        # The Rust tokenizer under the transformers wrapper: the wrapper releases the GIL,
        # and taking it back from a busy engine thread cost ~0.7 ms per call (vs 0.06 ms).
        self._backend = getattr(self.tokenizer, "backend_tokenizer", None)
        # Text a user sent is text: "<|im_start|>system" in a message must not become the control
        # token (the Rust tokenizer matches added tokens even with add_special_tokens=False). Such
        # content is encoded by a copy of the tokenizer that splits no special tokens out of it.
        self._plain = None
        self._specials: tuple[str, ...] = ()
        if self._backend is not None:
            from tokenizers import Tokenizer

            self._plain = Tokenizer.from_str(self._backend.to_str())
            self._plain.encode_special_tokens = True
            self._specials = tuple(t.content for t in self._backend.get_added_tokens_decoder().values()
                                   if t.special and t.content)
        else:
            self._specials = tuple(getattr(self.tokenizer, "all_special_tokens", ()))

    @property
    def fast_path(self) -> bool:
        return self.options.fast_path != "off" and fastllama.supports(self.model) is None

    def fast_weights(self) -> fastllama.FastWeights | None:
        """The weights for the lean forward (built once), or None when the model runs through
        the Hugging Face forward."""
        if not self.fast_path:
            return None
        if self._fast is None:
            packed = self.options.packed_weights != "off" and onednn.usable(self.device, self.dtype)
            half = self._half_matrices()
            self._fast = fastllama.FastWeights(self.model, self.dtype, self.device, packed=packed and not half,
                                               half=half, attention=self.options.decode_attention)
            setting = self.options.int8_small_batch
            native_on = setting != "off" and self.options.native_step != "off" \
                and native.usable(self.device, self.dtype) and self._native_library()
            if setting == "auto" and half and not native_on:
                # through torch, int8 copies were slower than the float16 matrices even at 1 row
                # (0.86-0.94x timed on an AVX2-only CPU): not made
                log.info("int8 weights: none beside float16 matrices (auto)")
            elif setting != "off":
                auto = native.auto_rows(self.dtype) if native_on else int8.AUTO_ROWS
                self._fast.add_int8(int8.ON_ROWS if setting == "on" else auto)
                if native_on and self._fast.int8_rows:
                    self._fast.add_native()
                    if setting == "auto" and native.groups_pay(self.dtype):
                        self._fast.native_groups = True
                log.info("int8 weights for decode steps of up to %d rows (%s)", self._fast.int8_rows, setting)
            log.info("fast path: %s", self.matrix_format)
        return self._fast

    @staticmethod
    def _native_library() -> bool:
        """The native step's library, built or found (native.py); False (logged) without it."""
        try:
            native.library()
            return True
        except (RuntimeError, OSError) as exc:  # no compiler, say: torch runs those steps
            log.warning("native decode step unavailable, decode steps stay on torch: %s", exc)
            return False

    def _half_matrices(self) -> bool:
        """INFERQL_FP16_MATRICES: on or auto, wherever fbgemm runs them (fbgemm.py)."""
        return self.options.fp16_matrices != "off" and fbgemm.usable(self.device, self.dtype)

    @property
    def matrix_format(self) -> str:
        """How the fast path's matrices are kept and its decode attention runs, in words (for
        logs and the bench)."""
        fast = self.fast_weights()
        if fast is None:
            return f"{str(self.dtype).removeprefix('torch.')} weights through the Hugging Face forward"
        dt = str(fast.dtype).removeprefix("torch.")
        if fast.half:
            head = "the head's full pass in int8" if type(fast.head) is fbgemm.Int8Head else "the head float16 too"
            form = f"{dt} model, matrices in float16 multiplied in float32 by fbgemm, {head}"
        elif fast.packed:
            form = f"{dt} matrices prepacked for oneDNN"
        else:
            form = f"{dt} matrices"
        if fast.int8_rows:
            form += f"; int8 copies for decode steps of up to {fast.int8_rows} rows"
            form += ", run as one native call" if fast.native is not None else ""
            if fast.native is not None and fast.native_groups:
                form += f" (bigger steps: one call per {fast.int8_rows} rows)"
        return form + ("; decode attention by SDPA" if fast.sdpa_decode else "; decode attention as two matmuls")

    def token_text(self, token_id: int) -> str:
        """The text of one token alone (for alternatives); memoised, the vocabulary is small."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id])
        return text

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation, ending with the assistant's turn opened. Special-token
        text inside a message's content stays text (see encode_text)."""
        guarded = any(self.has_special_text(m["content"]) for m in messages)
        if len(messages) == 1 and messages[0]["role"] == "user" and self._user_frame is not None:
            prefix, suffix = self._user_frame  # the common case, without rendering the template
            if guarded:
                return self.encode_raw(prefix) + self.encode_text(messages[0]["content"]) + self.encode_raw(suffix)
            return self.encode_raw(prefix + messages[0]["content"] + suffix)
        if not getattr(self.tokenizer, "chat_template", None):  # plain "role: content" lines
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
            return self.encode_text(text) if guarded else self.encode_raw(text)
        if not guarded:
            return self.encode_raw(self._render(messages))
        # Render with a placeholder per content, then encode the template's own text (its
        # control tokens) and each content (as plain text) separately.
        marks = [f"\ue000{i}\ue001" for i in range(len(messages))]
        text = self._render([{**m, "content": mark} for m, mark in zip(messages, marks)])
        ids: list[int] = []
        for mark, message in zip(marks, messages):
            head, found, text = text.partition(mark)
            if not found:  # the template rewrote the content: it cannot be placed safely
                raise ValueError("the chat template does not insert message contents verbatim")
            ids += self.encode_raw(head) + self.encode_text(message["content"])
        return ids + self.encode_raw(text)

    def _render(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def has_special_text(self, text: str) -> bool:
        return any(s in text for s in self._specials)

    def encode_text(self, text: str) -> list[int]:
        """Ids of text from a user: special-token text in it is split as ordinary text."""
        if self._plain is not None:
            return self._plain.encode(text, add_special_tokens=False).ids
        return list(self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])

    def encode_raw(self, text: str) -> list[int]:
        if self._backend is not None:
            return self._backend.encode(text, add_special_tokens=False).ids
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def user_turn_frame(tokenizer) -> tuple[str, str] | None:
    """The text a chat template puts around a lone user message, so that such a prompt
    (most of them) skips the Jinja render (~0.4 ms of the event loop per request).

    Only when the template inserts the message verbatim: rendered around two different
    probes (with edge whitespace and template syntax, which a `trim` or an escape would
    change), the text around them must be the same."""
    if not getattr(tokenizer, "chat_template", None):
        return None

    def render(content: str) -> str:
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)

    probes = (" \n<probe-1>{{ x }}\n ", "\t<probe-2>&amp;%}\t")
    try:
        first = render(probes[0])
        prefix, _, suffix = first.partition(probes[0])
        if first.count(probes[0]) != 1 or render(probes[1]) != prefix + probes[1] + suffix:
            return None
    except Exception:  # a template that cannot render a lone user turn: always use the slow path
        return None
    return prefix, suffix


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def load_model(path: Path, device: str = "auto", threads: int = 0, dtype: str | None = None,
               options: EngineOptions | None = None) -> LoadedModel:
    """Options default to EngineOptions() (the settings' defaults); `dtype` overrides theirs.
    Runs in a thread of its own that ends with the load (threads.py: the calling thread,
    often the event loop's, must not keep an OpenMP pool beside the engine's)."""
    return in_passing_thread(_load_model, path, device, threads, dtype, options)


def _load_model(path: Path, device: str, threads: int, dtype: str | None,
                options: EngineOptions | None) -> LoadedModel:
    if threads > 0:
        torch.set_num_threads(threads)
    if options is None:
        options = EngineOptions()
    if dtype is not None:
        options = dataclasses.replace(options, dtype=dtype)
    dev = pick_device(device)
    version = weights_version(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    compute = pick_dtype(options.dtype, dev)
    # The fast path keeps float32 master weights (its float32 logits read them) and makes its
    # own copies in `compute`; the Hugging Face forward runs in `compute` itself, except that
    # on CPU 16-bit weights there would also round the logits, so it stays float32.
    fast = options.fast_path != "off"
    load_dtype = torch.float32 if fast or dev.type == "cpu" else compute
    model = AutoModelForCausalLM.from_pretrained(path, dtype=load_dtype)
    model.to(dev)
    model.eval()
    cfg = model.config
    eos_ids = _eos_ids(cfg, tokenizer)
    if fast and fastllama.supports(model) is not None:  # not a Llama-family model: the HF forward
        log.info("fast path off for this model (%s)", fastllama.supports(model))
        if dev.type != "cpu" and compute != torch.float32:
            model.to(compute)
        else:
            compute = torch.float32
        fast = False
    elif not fast:
        compute = load_dtype
    marker = read_marker(path)
    info = ModelInfo(
        id=marker.get("name") or path.name,
        version=version,
        parameters=sum(p.numel() for p in model.parameters()),
        dtype=str(compute).removeprefix("torch."),
        device=dev.type,
        context_length=int(getattr(cfg, "max_position_embeddings", 2048)),
        source=marker.get("source") or "local",
    )
    log.info("loaded model %s version %s on %s (%d params)", info.id, info.version, info.device, info.parameters)
    lm = LoadedModel(model=model, tokenizer=tokenizer, info=info, eos_ids=frozenset(eos_ids), device=dev,
                     options=options, dtype=compute)
    lm.fast_weights()  # convert now, not on the first request
    return lm


def _eos_ids(cfg, tokenizer) -> set[int]:
    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id]
    ids = {i for i in eos if i is not None}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def load_for_counting(path: Path, options: EngineOptions | None = None) -> LoadedModel:
    """What an API replica that runs no engine needs of the model: its tokenizer and chat
    template (prompt checks, token counts) and its description. The weights stay on disk:
    the module is built on the meta device, which allocates nothing."""
    from transformers import AutoConfig

    options = options or EngineOptions()
    tokenizer = AutoTokenizer.from_pretrained(path)
    cfg = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    marker = read_marker(path)
    info = ModelInfo(
        id=marker.get("name") or path.name,
        version=weights_version(path),
        parameters=sum(p.numel() for p in model.parameters()),
        dtype=options.dtype,   # the workers decide ("auto": by their hardware)
        device="worker",
        context_length=int(getattr(cfg, "max_position_embeddings", 2048)),
        source=marker.get("source") or "local",
    )
    return LoadedModel(model=model, tokenizer=tokenizer, info=info, eos_ids=frozenset(_eos_ids(cfg, tokenizer)),
                       device=torch.device("meta"), options=options)
