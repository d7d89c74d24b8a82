"""Every config field, with the reference's defaults (LoRA rank 1 on up_proj, DirectRefusal).

Override any field from the command line: `--config.lora.rank=4 --config.train.lr=1e-4`. The
launchers turn this ConfigDict into a typed `lora_jax.run_config.RunConfig` once, checking each key
against its rule there (`RULES`, with the dataclass defaults equal to these); a new key needs both.
"""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
  c = ConfigDict()

  c.model = ConfigDict()
  c.model.source = "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"  # HF dir, hub id or .gguf
  c.model.tokenizer = ""  # tokenizer source; "" = model.source
  c.model.dtype = ""  # param (master) dtype; "" = as train.precision sets it
  c.model.compute_dtype = ""  # "" = as train.precision sets it
  c.model.remat = "none"  # none | full | dots
  # auto | xla | cudnn | splash; auto = cuDNN flash attention on GPU (bf16/fp16), Pallas splash
  # attention on TPU, plain XLA on CPU (lora_jax/attention.py)
  c.model.attention = "auto"

  c.data = ConfigDict()
  c.data.source = "TianshengHuang/DirectRefusal"
  c.data.split = "train"
  c.data.config_name = None
  c.data.format = "direct_refusal"  # direct_refusal | star1 | chat | prompt_completion | messages
  c.data.max_length = 1024
  c.data.packing = False
  c.data.bucket = 64
  c.data.eval_source = None
  c.data.eval_split = None
  c.data.eval_fraction = 0.0
  c.data.shuffle = True
  c.data.seed = None  # None = train.seed
  c.data.loss_on = "completion"  # completion (TRL 0.17) | all (prompt + completion, TRL 0.15/0.16)

  c.train = ConfigDict()
  c.train.mode = "lora"  # lora | full
  c.train.epochs = 10
  c.train.steps = 0  # > 0 overrides epochs
  c.train.batch_size = 2  # global batch
  c.train.grad_accum = 1
  c.train.lr = 5e-5
  c.train.schedule = "cosine"  # cosine | linear | constant
  c.train.warmup_steps = 0
  c.train.weight_decay = 1e-4
  c.train.b1 = 0.9
  c.train.b2 = 0.999
  c.train.eps = 1e-8
  c.train.clip_norm = 1.0
  c.train.seed = 0
  c.train.loss_chunk = 0  # > 0: compute logits this many tokens at a time (saves memory)
  c.train.peak_flops = 0.0  # per-device peak for MFU; 0 = known accelerator table / CPU measured
  # float32 | mixed (float32 master, bf16 compute) | reference (the reference's torch numerics:
  # LoRA on a bf16 base under fp16 autocast with GradScaler loss scaling, full FT in pure bf16)
  c.train.precision = "float32"

  c.lora = ConfigDict()
  c.lora.rank = 1
  c.lora.alpha = 16.0
  c.lora.dropout = 0.05
  c.lora.targets = "up_proj"  # module names or groups: qkvo_mlp, mlp, attn, all
  c.lora.layers = ""  # "" = all; "16-31" or the reference's "from16_to31" (inclusive)
  c.lora.use_rslora = False

  c.ortho = ConfigDict()  # the reference's orthogonal regulariser (off when beta == 0)
  c.ortho.beta = 0.0
  c.ortho.k = 16
  c.ortho.mode = "column"  # column | row | both
  c.ortho.weighted = True
  c.ortho.normalize = False
  c.ortho.targets = "gate_proj,up_proj,down_proj"
  c.ortho.span_dtype = "bfloat16"
  c.ortho.svd = "randomized"
  c.ortho.k_mode = "per_module"  # per_module | reference (k on the first module, min(k, r) after)

  c.mesh = ConfigDict()
  c.mesh.shape = "fsdp:-1"  # axis:size pairs over (data, fsdp, tensor); -1 = the rest

  c.checkpoint = ConfigDict()
  c.checkpoint.every_steps = 0  # 0 = only at epoch ends
  c.checkpoint.every_epoch = True  # the trade-off curves need every epoch
  c.checkpoint.max_to_keep = 0  # 0 = keep all
  c.checkpoint.async_save = True

  c.log = ConfigDict()
  c.log.every_steps = 10
  c.log.tensorboard = True
  c.log.eval_every_steps = 0  # held-out loss every N steps (and at every epoch end)
  c.log.progress = True
  return c
