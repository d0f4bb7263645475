"""Supervised fine-tuning examples: JSONL files, chat templates, and loss masks.

Each line of an SFT file is one example, either

    {"prompt": "...", "response": "..."}                      (a user and an assistant turn)
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}

and is normalised to the second form. A template (`data.sft_template`) turns the
turns into text:

    plain  "System: ...\\n" / "User: ...\\n" for those turns, "Assistant: " then the
           reply followed by the tokenizer's eos token for assistant turns;
    hf     the chat template beside a tokenizer.json `data.tokenizer` (an imported
           Hugging Face model's own; data.hf_tokenizer.read_tokenizer_config), rendered
           with jinja2 as transformers renders it; it supplies its own end-of-turn text.

`encode_example` gives the token ids and a mask that is 1 on the tokens of
assistant turns (with the eos or end-of-turn text ending them) and 0 elsewhere:
only the responses are learned. `prompt_ids` are the tokens a model is prompted
with to generate the last assistant turn (as training encodes them), and
`reference` that turn's content.
"""

import itertools
import json
import os

import numpy as np
from absl import logging

from data.config import SFT_TEMPLATES
from data.hf_tokenizer import chat_template as chat_template_of, read_tokenizer_config
from errors import UserError

ROLES = ("system", "user", "assistant")
_PLAIN_PREFIX = {"system": "System: ", "user": "User: ", "assistant": "Assistant: "}
_FORMAT = (
    'each line must be a JSON object with "prompt" and "response" strings, or "messages": '
    'a list of {"role": "system"|"user"|"assistant", "content": string} with an assistant turn'
)
_SHOWN_BAD_LINES = 5  # bad lines logged one by one when skipped; the rest are only counted


class Template:
    """A template by name; `chat_template` is the jinja source for "hf"."""

    def __init__(self, name: str, chat_template: str = "", special_tokens: dict | None = None):
        if name not in SFT_TEMPLATES:
            raise UserError(
                f"data.sft_template={name!r}: must be one of {', '.join(SFT_TEMPLATES)}."
            )
        if name == "hf" and not chat_template:
            raise UserError(
                "data.sft_template=hf needs the tokenizer's chat template: use "
                "data.sft.load_template(data.sft_template, data.tokenizer)."
            )
        self.name = name
        self._special_tokens = special_tokens or {}
        self._jinja = _compile(chat_template) if chat_template else None

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The "hf" template's text for `messages`, as transformers' apply_chat_template."""
        return self._jinja.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **self._special_tokens
        )


def _compile(source: str):
    import jinja2.sandbox  # only the "hf" template needs it

    def raise_exception(message):
        raise UserError(f"data.sft_template=hf: the chat template refused an example: {message}")

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except jinja2.TemplateError as error:
        raise UserError(
            f"data.sft_template=hf: the chat template is not valid jinja ({error})."
        ) from None


def _token_text(token) -> str:
    return token.get("content", "") if isinstance(token, dict) else token or ""


def load_template(name: str, tokenizer_path: str) -> Template:
    """The template `data.sft_template` names; "hf" is the tokenizer's own chat template
    (data.hf_tokenizer.read_tokenizer_config says where it is read from). Logs which
    template is used and why, and warns when plain is used on a tokenizer with a template."""
    config = read_tokenizer_config(tokenizer_path) if tokenizer_path.endswith(".json") else {}
    chat_template = chat_template_of(config)
    if name == "hf" and not chat_template:
        raise UserError(
            f"data.sft_template=hf: data.tokenizer={tokenizer_path!r} has no chat_template (it is "
            "read from chat_template.jinja or the chat_template of tokenizer_config.json beside "
            "a tokenizer.json, the one named default of several); use data.sft_template=plain."
        )
    if name == "hf":
        logging.info("SFT template: hf (the chat template of %s)", tokenizer_path)
        tokens = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token")}
        return Template("hf", chat_template, tokens)
    if chat_template:
        logging.warning(
            "SFT template: %s, as data.sft_template asks, although %s has a chat template "
            "(data.sft_template=hf uses the format the model was tuned with).",
            name,
            tokenizer_path,
        )
    else:
        logging.info("SFT template: %s (the tokenizer has no chat template)", name)
    return Template(name)


def _as_template(template) -> Template:
    return template if isinstance(template, Template) else Template(template or "plain")


def _normalise(record) -> tuple[dict | None, str]:
    """(the example as {"messages": [...]}, "") or (None, what is wrong)."""
    if not isinstance(record, dict):
        return None, f"a JSON {type(record).__name__}, not an object"
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            return None, '"messages" is not a non-empty list'
        for i, turn in enumerate(messages):
            if not isinstance(turn, dict) or turn.get("role") not in ROLES:
                return None, f'messages[{i}] has no "role" of {", ".join(ROLES)}'
            if not isinstance(turn.get("content"), str):
                return None, f'messages[{i}] has no "content" string'
        if not any(turn["role"] == "assistant" for turn in messages):
            return None, "no assistant turn"
        return {"messages": [{"role": t["role"], "content": t["content"]} for t in messages]}, ""
    missing = [k for k in ("prompt", "response") if not isinstance(record.get(k), str)]
    if missing:
        return None, f"no {' or '.join(repr(k) for k in missing)} string"
    turns = [("user", record["prompt"]), ("assistant", record["response"])]
    return {"messages": [{"role": r, "content": c} for r, c in turns]}, ""


def read_jsonl(path: str, skip_bad_lines: bool = False) -> tuple[list[dict], int]:
    """(the examples of an SFT JSONL file, normalised to {"messages": [...]}; the number of
    bad lines skipped). A bad line stops with its file and line number unless
    `skip_bad_lines`; blank lines are ignored."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such SFT file; give a JSONL file of examples.")
    examples, num_bad = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                example, problem = _normalise(json.loads(line))
            except json.JSONDecodeError as error:
                example, problem = None, f"not JSON ({error.msg}, column {error.colno})"
            if example is not None:
                examples.append(example)
                continue
            message = f"{path}:{number}: {problem}; {_FORMAT}"
            if not skip_bad_lines:
                raise UserError(
                    f"{message}. Fix the line, or set data.skip_bad_lines=True to skip and count "
                    "bad lines."
                )
            num_bad += 1
            if num_bad <= _SHOWN_BAD_LINES:
                logging.warning("Skipped %s", message)
    return examples, num_bad


def _last_assistant(messages: list[dict]) -> int:
    return max(i for i, turn in enumerate(messages) if turn["role"] == "assistant")


def _segments(messages: list[dict], template: Template) -> list[tuple[str, bool]]:
    """The example's text as (text, is_response) pieces; plain responses are followed by eos."""
    if template.name == "plain":
        pieces = []
        for turn in messages:
            prefix = _PLAIN_PREFIX[turn["role"]]
            if turn["role"] == "assistant":
                pieces += [(prefix, False), (turn["content"], True)]
            else:
                pieces.append((f"{prefix}{turn['content']}\n", False))
        return pieces
    pieces, done = [], ""
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        prompt = template.render(messages[:i], add_generation_prompt=True)
        full = template.render(messages[: i + 1], add_generation_prompt=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise UserError(
                "data.sft_template=hf: the chat template does not render a conversation turn by "
                "turn (a prefix of the turns is not a prefix of the text), so the assistant "
                "tokens cannot be told apart; use data.sft_template=plain."
            )
        pieces += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    rest = template.render(messages, add_generation_prompt=False)
    return pieces + [(rest[len(done) :], False)] if rest.startswith(done) else pieces


def encode_example(tokenizer, example: dict, template) -> tuple[np.ndarray, np.ndarray]:
    """(token ids int32, loss mask float32: 1 on assistant tokens, incl. the eos ending them)."""
    template = _as_template(template)
    ids, mask = [], []
    for is_response, pieces in itertools.groupby(
        _segments(example["messages"], template), key=lambda piece: piece[1]
    ):
        text = "".join(text for text, _ in pieces)  # encoded whole, as a prompt would be
        if not text:
            continue
        piece = tokenizer.encode(text)
        bos = getattr(tokenizer, "bos_id", None)
        if piece and bos is not None and piece[0] == bos and (ids or piece[1:2] == [bos]):
            piece = piece[1:]  # a bos the tokenizer adds to every text belongs at the start only
        if is_response and template.name == "plain":
            piece = [*piece, tokenizer.eos_id]
        ids += piece
        mask += [float(is_response)] * len(piece)
    return np.asarray(ids, np.int32), np.asarray(mask, np.float32)


def prompt_ids(tokenizer, example: dict, template) -> np.ndarray:
    """The token ids before the last assistant turn's content, exactly as in training."""
    ids, mask = encode_example(tokenizer, example, template)
    last = np.flatnonzero(mask)[-1]  # the last response's last token
    before = np.flatnonzero(mask[:last] == 0)
    return ids[: before[-1] + 1 if before.size else 0]


def reference(example: dict) -> str:
    """The content of the last assistant turn (what generation is compared with)."""
    messages = example["messages"]
    return messages[_last_assistant(messages)]["content"]
