"""KV-cache sampler: batched, continuous-batching generation for long reasoning traces.

from lora_jax.sampling import generate_text, generate, chat
results = generate_text(model, tokenizer, prompts, max_new_tokens=2048, temperature=0.6,
                        top_p=0.95, n=8, seed=0, stop=("Problem:",), on_result=append_jsonl)
"""

from lora_jax.sampling.engine import Completion, Engine, Request, bucket
from lora_jax.sampling.generate import generate
from lora_jax.sampling.memory import SamplingError
from lora_jax.sampling.processors import choose, keep_threshold
from lora_jax.sampling.stops import StopStrings
from lora_jax.sampling.text import chat, encode_prompts, generate_text

__all__ = [
  "Completion",
  "Engine",
  "Request",
  "SamplingError",
  "StopStrings",
  "bucket",
  "chat",
  "choose",
  "encode_prompts",
  "generate",
  "generate_text",
  "keep_threshold",
]
