"""Training data: load a refusal set, tokenise it as the reference does, batch it for JAX.

    examples, report = load_examples(DataConfig(source=..., format=...), tokenizer)
    it = make_iterator(examples, global_batch=2, seed=0, pad_id=pad_token_id(tokenizer))
    batch = next(it)      # this host's rows of the next global batch (numpy int32 arrays)
    it.state()            # JSON-able; make_iterator(..., state=state) resumes exactly

Sources: a hub id (`TianshengHuang/DirectRefusal`, `UCSC-VLAA/STAR-1`), a local .jsonl / .json /
.parquet / .csv file, or a local data directory. Formats (`data.format`): `direct_refusal`
(prompt, refusal), `star1` (question, response), `chat` (prompt, completion), `prompt_completion`
(plain text), `messages` (a conversation). See formats.py for how each becomes tokens.

demo_refusals.jsonl (written for this project, not copied from any data set): 32 plainly harmful
requests with short polite refusals and 16 benign requests with short helpful answers, as
{"prompt", "completion"} rows. The CPU demo trains SmolLM2-135M-Instruct on it with
`data.source=lora_jax/data/demo_refusals.jsonl data.format=chat`: its ChatML chat template renders
each pair and the loss falls on the assistant's reply. On an R1 tokenizer the same rows get the
DeepSeek hand format. `DEMO_REFUSALS` is its path.
"""

import os

from lora_jax.data.formats import FORMATS, DataError
from lora_jax.data.pipeline import (
  LOSS_ON,
  DataConfig,
  DataIterator,
  Examples,
  load_examples,
  load_rows,
  make_iterator,
  pack,
  pad_token_id,
)

DEMO_REFUSALS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_refusals.jsonl")

__all__ = [
  "DEMO_REFUSALS",
  "FORMATS",
  "LOSS_ON",
  "DataConfig",
  "DataError",
  "DataIterator",
  "Examples",
  "load_examples",
  "load_rows",
  "make_iterator",
  "pack",
  "pad_token_id",
]
