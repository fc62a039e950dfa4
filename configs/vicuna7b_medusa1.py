"""Medusa-1 on Vicuna-7B v1.3 (the paper's setting): frozen backbone, 5 heads trained on ShareGPT.

Real scale: needs the HF weights (a safetensors directory; this code never downloads) and a
multi-device machine. Check that a mesh fits before renting it (no weights, fake CPU devices):

  python -m medusa_jax.fit --config configs/vicuna7b_medusa1.py --devices 8
  python -m medusa_jax.fit --config configs/vicuna7b_medusa1.py:tpu --devices 16

One host with 8 GPUs (``pip install -U "jax[cuda12]==<the pinned jax version>"`` first):

  python -m medusa_jax.train --config configs/vicuna7b_medusa1.py \
      --config.model=/data/vicuna-7b-v1.3 --workdir runs/vicuna7b_medusa1

A TPU VM pod slice (v4-32, v5e-64, ...): the same command on every worker (docs/scale_out.md):

  gcloud compute tpus tpu-vm ssh $TPU --zone=$ZONE --worker=all --command="cd medusa_jax && \
      .venv/bin/python -m medusa_jax.train --config configs/vicuna7b_medusa1.py:tpu \
      --config.model=/data/vicuna-7b-v1.3 --workdir /mnt/ckpt/vicuna7b_medusa1"

Decoding (the CLIs use one device: bf16 weights are 13.5 GB; ``medusa.make_decoder(..., placement=
sharding.DecodePlacement.from_config(config, cfg, hcfg))`` runs tensor-parallel on ``config.mesh.decode_shape``):

  python -m medusa_jax.generate --config configs/vicuna7b_medusa1.py --config.model=/data/vicuna-7b-v1.3 \
      --checkpoint runs/vicuna7b_medusa1/export --prompt "Why is the sky blue?"

``--config.heads_dir=/data/medusa-vicuna-7b-v1.3`` starts training from the release's published
heads (``medusa_lm_head.safetensors`` + ``config.json``, read by ``release_heads.load``);
``--heads /data/medusa-vicuna-7b-v1.3`` decodes with them directly.

Variants: ``:gpu8`` (the default: one host, 8 GPUs), ``:tpu`` (a pod slice with a multiple of 16 chips).
"""

from ml_collections import ConfigDict

from medusa_jax import config as config_lib

# config.json of lmsys/vicuna-7b-v1.3: lets medusa_jax.fit size the model without its weights.
VICUNA_7B = dict(
    model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, rope_theta=10000.0,
    rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=2048, bos_token_id=1,
    eos_token_id=2)

def get_config(arg=None):
  c = config_lib.default_config()
  vicuna(c, "/path/to/vicuna-7b-v1.3", VICUNA_7B)
  # The paper's Medusa-1 recipe (lr 1e-3, cosine, 10% warm-up, no weight decay: the defaults).
  c.train.steps = 1000             # ~2 epochs of the 17.7k bundled ShareGPT conversations at batch 32
  c.train.checkpoint_every = 200
  c.train.eval_every = 200
  return with_variants(c, arg, "configs/vicuna7b_medusa1.py")


def with_variants(c, arg, where: str):
  """The placement variants every Vicuna config shares; one host with 8 GPUs unless ``:tpu``."""
  gpu8(c)
  return config_lib.apply_variants(c, arg, {"gpu8": gpu8, "tpu": tpu}, where)


def vicuna(c, model_path: str, arch: dict) -> None:
  """What every Vicuna config shares: the model, the release's head layout, data, precision."""
  c.model = model_path            # an HF safetensors directory: set --config.model=/path/to/it
  c.model_arch = ConfigDict(arch)  # its config.json fields, for the fit check without weights
  c.heads_dir = ""                # optional: heads in the release's format to start from
  # The release's heads (FasterDecoding/medusa-vicuna-7b-v1.3): 5 heads of 1 residual block, each
  # with its own LM head initialised from the backbone's.
  c.heads.num_heads = 5
  c.heads.num_layers = 1
  c.heads.shared_lm_head = False
  c.heads.draft_vocab = 0
  # Vicuna was fine-tuned on ShareGPT, so its own replies are the right targets (no distillation).
  c.data.source = "sharegpt"
  c.data.max_len = 2048
  c.train.seq_len = 2048
  c.train.remat_heads = True      # one [B, L, 32000] logits tensor live at a time in the backward pass
  c.decode.mode = "medusa"
  c.decode.tree = "mc_sim_7b_63"
  # bfloat16 on GPU/TPU: the loaded weights are stored in this dtype (frozen here: halves their memory).
  c.dtype = "bfloat16"
  # The Medusa blocks' output width stays whole: XLA in jax 0.10.2 computes the blocks' input
  # gradient wrongly when their [D, D] weight is split over both fsdp and tensor while the batch is
  # split over fsdp (tests/test_sharding.py::test_xla_partitioner_bug). The blocks are small.
  c.mesh.rules = tuple((k, None if k == "embed_out" else v) for k, v in c.mesh.rules)


def gpu8(c) -> None:
  """Training: FSDP over the 8 GPUs of one host (weights and optimizer state split 8 ways)."""
  c.mesh.shape = (("data", -1), ("fsdp", 8), ("tensor", 1))
  c.train.batch_size = 32        # 4 rows of 2048 tokens per GPU
  _decode_tensor_parallel(c)


def tpu(c) -> None:
  """Training: FSDP over 16 chips of a slice, data parallel over the rest; several hosts."""
  # v4-32 (16 chips): data=1; v5e-64: data=4. Batch 64: 4 rows per chip on v4-32, 1 on v5e-64.
  c.mesh.shape = (("data", -1), ("fsdp", 16), ("tensor", 1))
  c.train.batch_size = 64
  c.train.steps = max(1, c.train.steps // 2)
  # Several hosts: every process joins one JAX job (TPU VMs are found automatically).
  c.mesh.distributed_init = "always"
  _decode_tensor_parallel(c)


def _decode_tensor_parallel(c) -> None:
  # Decoding at batch 1: every device takes a share of the heads, MLP and vocabulary.
  c.mesh.decode_shape = (("data", 1), ("fsdp", 1), ("tensor", -1))
