"""Chat rendering: a conversation through the tokenizer's chat template, with an assistant-only loss mask.

``render_example(tokenizer, conversation, max_len)`` gives ``tokens`` and a ``loss_mask`` that is 1 on
the assistant replies and their end-of-turn token. A conversation is a ShareGPT record
(``{'id', 'conversations': [{'from', 'value'}, ...]}``), a list of such turns, or an OpenAI-style
message list (``[{'role', 'content'}, ...]``); ``to_messages`` turns it into the template's messages.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from medusa_jax import sharegpt


def _turns(conversation: Any) -> list | None:
  if isinstance(conversation, Mapping):
    conversation = conversation.get('conversations', conversation.get('messages'))
  return conversation if isinstance(conversation, (list, tuple)) else None


def to_messages(conversation: Any) -> list[dict] | None:
  """Chat-template messages ``[{'role', 'content'}, ...]`` for training, or None if unusable.

  Keeps an optional leading non-empty system turn, skips assistant turns before the first user
  turn, then keeps the longest strictly alternating user/assistant prefix without empty turns and
  drops a trailing user turn (it has no reply to learn). None when no assistant reply remains or a
  speaker is unknown.
  """
  turns = _turns(conversation)
  if not turns:
    return None
  pairs = [sharegpt.turn_role_and_text(t) for t in turns]
  if any(p is None for p in pairs):
    return None
  messages = []
  if pairs[0][0] == 'system':
    # An empty system turn is dropped so the template's default system prompt applies, as it
    # will at inference time.
    if pairs[0][1].strip():
      messages.append({'role': 'system', 'content': pairs[0][1]})
    pairs = pairs[1:]
  # ShareGPT V3 cuts long conversations into parts, and a later part usually opens with the reply
  # to a prompt left in the previous part. That orphan reply is dropped (as the original Medusa /
  # FastChat preprocessing does) and the part is kept from its first user turn on.
  while pairs and pairs[0][0] == 'assistant':
    pairs = pairs[1:]
  expected = 'user'
  for role, text in pairs:
    if role != expected or not text.strip():
      break
    messages.append({'role': role, 'content': text})
    expected = 'assistant' if role == 'user' else 'user'
  if messages and messages[-1]['role'] == 'user':
    messages.pop()
  if not any(m['role'] == 'assistant' for m in messages):
    return None
  return messages


def first_user_prompt(conversation: Any) -> str | None:
  """The text of the first human/user turn (the prompt self-distillation replies to), or None."""
  for turn in _turns(conversation) or ():
    pair = sharegpt.turn_role_and_text(turn)
    if pair is not None and pair[0] == 'user' and pair[1].strip():
      return pair[1]
  return None


def _assistant_char_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]] | None:
  """The rendered text and the [start, end) character span of each assistant reply + end token.

  The span of reply i runs from the end of the template applied to ``messages[:i]`` with the
  generation prompt (so the ``<|im_start|>assistant\\n`` header is excluded) to the last end-of-turn
  token rendered by ``messages[:i+1]`` (so the newline the template puts after it is excluded).
  None if the template is not prefix-stable (rendering a longer conversation changes earlier text).
  """
  text = tokenizer.apply_chat_template(messages, tokenize=False)
  eos = tokenizer.eos_token or ''
  spans = []
  for i, message in enumerate(messages):
    if message['role'] != 'assistant':
      continue
    head = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
    upto = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
    if not (upto.startswith(head) and text.startswith(upto)):
      return None
    reply = upto[len(head):]
    cut = reply.rfind(eos) if eos else -1
    end = len(head) + (cut + len(eos) if cut >= 0 else len(reply.rstrip()))
    spans.append((len(head), end))
  return text, spans


def render_example(tokenizer, conversation: Any, max_len: int) -> dict | None:
  """Tokenises a conversation with the chat template; the mask covers only assistant replies.

  Args:
    tokenizer: a fast Hugging Face tokenizer with a chat template (offsets are needed).
    conversation: a ShareGPT record, a list of ShareGPT turns, or a list of role/content messages.
    max_len: keep at most this many tokens (truncating the end of the conversation).

  Returns:
    ``{'tokens': int32[L], 'loss_mask': int32[L]}`` with L <= max_len, where ``loss_mask`` is 1 on
    each token lying wholly inside an assistant reply or its closing end-of-turn token; or None
    when the conversation is unusable (see ``to_messages``) or no masked token survives truncation.
  """
  messages = to_messages(conversation)
  if messages is None:
    return None
  rendered = _assistant_char_spans(tokenizer, messages)
  if rendered is None:
    return None
  text, spans = rendered
  enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
  tokens = np.asarray(enc['input_ids'][:max_len], np.int32)
  offsets = np.asarray(enc['offset_mapping'][:max_len], np.int64).reshape(-1, 2)
  mask = np.zeros(len(tokens), np.int32)
  for start, end in spans:
    # Whole tokens only: a token straddling the header/reply boundary stays unmasked, so the mask
    # never reaches into template text.
    mask |= ((offsets[:, 0] >= start) & (offsets[:, 1] <= end)
             & (offsets[:, 1] > offsets[:, 0])).astype(np.int32)
  if not mask.any():
    return None
  return {'tokens': tokens, 'loss_mask': mask}

