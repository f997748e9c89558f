"""pqflow's own text generation: OpenAI-style chat and completion requests on a loaded model.

The registered model's ``predict`` (:mod:`pqflow.pyfunc_model`) and the tests call the same
functions, so a served model answers token for token what pqflow generates here.

* Chat prompts come from the tokenizer's chat template. A tokenizer without one (the tiny test
  tokenizer, many base models) gets :data:`DEFAULT_CHAT_TEMPLATE` (ChatML, the format of
  SmolLM2-Instruct and Qwen) and ``<|im_end|>`` as a stop string.
* Decoding: ``temperature == 0`` is greedy (argmax); above 0, softmax sampling at that temperature
  with nucleus ``top_p``, seeded by ``seed`` when given. One forward pass per token over a KV cache.
* It stops at the tokenizer's / generation config's end-of-sequence ids (plus the end-of-turn
  token of common chat formats for chat requests), at a ``stop`` string (cut from the text), at
  ``max_tokens``, or at the model's context length (``finish_reason`` ``"length"``).
* Bad requests raise :class:`RequestError` with one line naming the field; the pyfunc turns it
  into an HTTP 400.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pqflow.errors import PqflowError

DEFAULT_MAX_TOKENS = 128
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default; 0 = greedy
ROLES = ("system", "user", "assistant", "tool")
# ChatML: used when the tokenizer has no chat template of its own.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
DEFAULT_TEMPLATE_STOP = "<|im_end|>"
# End-of-turn tokens of common chat formats (ChatML, Llama 3, Phi-3, Gemma): a chat reply stops there
# when the tokenizer has the token.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")
MAX_STOP_STRINGS = 4


class RequestError(PqflowError, ValueError):
    """A request the model cannot answer (empty messages, a wrong type, a prompt longer than the
    context): the server answers it with HTTP 400."""


@dataclass
class Generation:
    text: str
    token_ids: list[int]  # the generated ids, an end-of-sequence id included when one ended it
    prompt_tokens: int
    finish_reason: str  # "stop" | "length"
    template: str = ""  # chat requests: "tokenizer" or "default" (ChatML)
    prompt_ids: list[int] = field(default_factory=list)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


def context_length(model: Any) -> int:
    """Tokens the model attends to (``max_position_embeddings`` of its config; 2048 if unset)."""
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return 2048


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def check_messages(messages: Any) -> list[dict[str, str]]:
    """OpenAI-style messages, checked: a non-empty list of ``{"role", "content"}`` with string content."""
    if hasattr(messages, "tolist") and not isinstance(messages, str):  # numpy arrays from a DataFrame
        messages = messages.tolist()
    if not isinstance(messages, list | tuple):
        raise RequestError(f"messages must be a list of {{role, content}} objects, got {type(messages).__name__}")
    if not messages:
        raise RequestError("messages is empty: send at least one {role, content} message")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError(f"messages[{i}] must be an object with role and content, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or role not in ROLES:
            raise RequestError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}"[:300])
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def chat_prompt(tokenizer: Any, messages: Sequence[dict[str, str]]) -> tuple[str, str]:
    """(prompt text, "tokenizer" | "default"): the messages rendered by the tokenizer's chat template
    with the generation prompt, or by :data:`DEFAULT_CHAT_TEMPLATE` when it has none."""
    own = has_chat_template(tokenizer)
    try:
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True,
                                             **({} if own else {"chat_template": DEFAULT_CHAT_TEMPLATE}))
    except Exception as e:  # noqa: BLE001 - a template that refuses the messages (e.g. role order)
        raise RequestError(f"the chat template refused the messages: {' '.join(str(e).split())[:200]}") from None
    return text, "tokenizer" if own else "default"


def encode_chat(tokenizer: Any, messages: Sequence[dict[str, str]]) -> tuple[list[int], str]:
    """Token ids of the chat prompt (the template writes any BOS itself, as ``apply_chat_template``
    with ``tokenize=True`` does) and which template rendered it."""
    text, template = chat_prompt(tokenizer, check_messages(messages))
    return list(tokenizer(text, add_special_tokens=False).input_ids), template


def encode_prompt(tokenizer: Any, prompt: Any) -> list[int]:
    """Token ids of a plain completion prompt, with the tokenizer's defaults (as pqflow's evaluation)."""
    if not isinstance(prompt, str):
        raise RequestError(f"prompt must be a string, got {type(prompt).__name__}")
    if not prompt:
        raise RequestError("prompt is empty")
    return list(tokenizer(prompt).input_ids)


def _eos_ids(model: Any, tokenizer: Any, chat: bool) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(tokenizer, "eos_token_id", None), getattr(getattr(model, "generation_config", None),
                                                                   "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, list | tuple):
            ids.update(int(i) for i in src)
    if chat:
        vocab = tokenizer.get_vocab()
        ids.update(vocab[t] for t in END_OF_TURN if t in vocab)
    return ids


def _options(max_tokens: Any, temperature: Any, top_p: Any, stop: Any, seed: Any) -> tuple[int, float, float, list[str], int | None]:
    def num(name: str, v: Any, kind: type, lo: float, hi: float) -> Any:
        if isinstance(v, bool) or not isinstance(v, int | float) or (kind is int and float(v) != int(v)):
            raise RequestError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {v!r}"[:200])
        if not lo <= v <= hi:
            raise RequestError(f"{name} must be between {lo} and {hi}, got {v}")
        return kind(v)

    max_tokens = num("max_tokens", DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens, int, 1, 1 << 20)
    temperature = num("temperature", DEFAULT_TEMPERATURE if temperature is None else temperature, float, 0.0, 2.0)
    top_p = num("top_p", 1.0 if top_p is None else top_p, float, 0.0, 1.0)
    if top_p == 0.0:
        raise RequestError("top_p must be above 0")
    if seed is not None:
        seed = num("seed", seed, int, 0, 2**63 - 1)
    if stop is None:
        stops: list[str] = []
    else:
        if hasattr(stop, "tolist") and not isinstance(stop, str):
            stop = stop.tolist()
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise RequestError("stop must be a non-empty string or a list of them")
        if len(stops) > MAX_STOP_STRINGS:
            raise RequestError(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}")
    return max_tokens, temperature, top_p, list(stops), seed


def _pick(logits: Any, temperature: float, top_p: float, gen: Any) -> int:
    import torch

    if temperature == 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p  # the smallest set whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


def _cache_keyword(model: Any) -> str:
    """``cache`` (transformers 5.x) or ``past_key_values`` (older), as the model's forward names it."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps the model
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


def generate_ids(model: Any, tokenizer: Any, prompt_ids: Sequence[int], *, max_tokens: Any = None,
                 temperature: Any = None, top_p: Any = None, stop: Any = None, seed: Any = None,
                 chat: bool = False, extra_stop: Sequence[str] = ()) -> Generation:
    """Generate from ``prompt_ids``; see the module docstring for the decoding and stop rules."""
    import torch

    max_tokens, temperature, top_p, stops, seed = _options(max_tokens, temperature, top_p, stop, seed)
    stops += [s for s in extra_stop if s not in stops]
    ctx = context_length(model)
    n = len(prompt_ids)
    if n == 0:
        raise RequestError("the prompt has no tokens")
    if n >= ctx:
        raise RequestError(f"the prompt has {n} tokens; the model's context is {ctx} tokens "
                           "(prompt and answer together): shorten it")
    budget = min(max_tokens, ctx - n)
    eos = _eos_ids(model, tokenizer, chat)
    gen = None
    if temperature > 0:
        gen = torch.Generator()
        gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,))))
    device = next(model.parameters()).device
    new: list[int] = []
    finish, text = "length", ""
    cache_kw = _cache_keyword(model)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([list(prompt_ids)], device=device), use_cache=True)
        for _ in range(budget):
            tok = _pick(out.logits[0, -1], temperature, top_p, gen)
            new.append(tok)
            if tok in eos:
                finish = "stop"
                break
            if stops:
                text = tokenizer.decode(new, skip_special_tokens=True)
                cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
                if cut >= 0:
                    text, finish = text[:cut], "stop"
                    break
            if len(new) == budget:
                break
            cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
            out = model(input_ids=torch.tensor([[tok]], device=device), use_cache=True, **{cache_kw: cache})
    if finish == "length" or not stops or new[-1] in eos:
        text = tokenizer.decode(new, skip_special_tokens=True)
    return Generation(text=text, token_ids=new, prompt_tokens=n, finish_reason=finish, prompt_ids=list(prompt_ids))


def chat(model: Any, tokenizer: Any, messages: Any, **options: Any) -> Generation:
    """Answer OpenAI-style ``messages`` (options: max_tokens, temperature, top_p, stop, seed)."""
    ids, template = encode_chat(tokenizer, messages)
    g = generate_ids(model, tokenizer, ids, chat=True,
                     extra_stop=(DEFAULT_TEMPLATE_STOP,) if template == "default" else (), **options)
    g.template = template
    return g


def complete(model: Any, tokenizer: Any, prompt: Any, **options: Any) -> Generation:
    """Continue a plain ``prompt`` (options as :func:`chat`)."""
    return generate_ids(model, tokenizer, encode_prompt(tokenizer, prompt), **options)
