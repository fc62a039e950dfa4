"""Tests of the prompts module (medusa_jax/prompts.py): ShareGPT prompts by split, the distilled dataset's name."""

import itertools

from medusa_jax import bundled
from medusa_jax import config as config_lib
from medusa_jax import data
from medusa_jax import prompts
from medusa_jax import runtime


def test_distilled_dataset_name_separates_settings():
  c = config_lib.default_config()
  base = prompts.distilled_dataset_name(c)
  assert base == "distill_smollm2_135m_instruct_t0_g256_p256_h0p02_n1024e32_l512"
  names = {base}
  for key, value in (("num_prompts", 2048), ("temperature", 0.3), ("max_new_tokens", 128), ("max_prompt_len", 512)):
    c2 = config_lib.default_config()
    c2.distill[key] = value
    names.add(prompts.distilled_dataset_name(c2))
  c2 = config_lib.default_config()
  c2.data.max_len = 1024
  names.add(prompts.distilled_dataset_name(c2))
  c2 = config_lib.default_config()
  c2.model = "/some/where/export"
  names.add(prompts.distilled_dataset_name(c2))
  assert len(names) == 7


def test_prompts_come_from_their_split_only():
  tok = bundled.smollm2_tokenizer()
  take = lambda split, n: list(itertools.islice(prompts.sharegpt_prompts(
      tok, split=split, heldout_fraction=0.02, max_prompt_len=100), n))
  train, held = take("train", 30), take("heldout", 3)
  assert len(train) == 30 and len(held) == 3
  assert all(not data.is_heldout(p.id, 0.02) for p in train)
  assert all(data.is_heldout(p.id, 0.02) for p in held)
  assert all(len(p.tokens) <= 100 for p in train + held)
  assert list(train[0].tokens) == runtime.chat_prompt(tok, train[0].text)


def test_heldout_eval_prompts_come_after_the_reserved_ones():
  tok = bundled.smollm2_tokenizer()
  c = config_lib.default_config()
  c.data.heldout_fraction = 0.5  # many heldout prompts early in the file: a quick test
  c.distill.max_prompt_len = 100
  held = list(itertools.islice(prompts.sharegpt_prompts(tok, split="heldout", heldout_fraction=0.5,
                                                        max_prompt_len=100), prompts.HELDOUT_RESERVED + 2))
  assert prompts.heldout_eval_prompts(c, tok, 2) == held[prompts.HELDOUT_RESERVED:]
