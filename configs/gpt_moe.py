r"""GPT-MoE language model on byte-level Python standard library source.

Run (2-core CPU, under 10 minutes, no download):

  python train.py --config configs/gpt_moe.py

Variants are picked after a colon, and any field can be overridden:

  python train.py --config configs/gpt_moe.py:small --workdir runs/small
  python train.py --config configs/gpt_moe.py --config.model.num_experts=32
  python train.py --config configs/gpt_moe.py:dense      # the dense baseline
  python train.py --config configs/gpt_moe.py:small,dense

  default       4 layers, d=256, 16 experts (d_ff 256) top-2, seq 256, batch 32,
                200 steps: 13.8M parameters, 2.8M active (CPU try-out)
  small         8 layers, d=512, 16 experts top-2, seq 1024, bf16: 109M / 21M (one GPU)
  medium        16 layers, d=1024, 32 experts top-4 + 1 shared, seq 2048, bf16,
                remat: 0.92B / 0.22B (a GPU node)
  mixtral_8x7b  Mixtral-8x7B shapes: 32 layers, d=4096, GQA 32/8, 8 experts of
                14336 top-2, vocab 32000: 46.7B total / 12.9B active parameters
  deepseek      DeepSeekMoE-16B shapes (fine-grained: 64 routed experts of 1408,
                top-6, 2 shared, first layer dense, vocab 102400) with
                DeepSeek-V3 sigmoid routing and aux-loss-free bias balancing:
                16.4B total / 2.8B active parameters
  dense         modifier: every MoE FFN becomes a dense FFN with the same
                active expert parameters (hidden = top_k*d_ff + shared)

The large variants are meant for GPU clusters (see scripts/slurm/); on a CPU
they are only checked with `jax.eval_shape` (tests/test_model.py).

What to expect from the default run on a 2-core CPU: validation loss about
2.15-2.17 nats/byte at step 50, 1.80-1.82 at 100, 1.60-1.62 at 150 and
1.51-1.52 at 200 (the range of two runs on two machines;
a run resumed after a kill repeats its own uninterrupted losses bit for bit
on one machine, not across machines); the last line printed is `done: step
200  train loss ...  val loss ... nats/token  wall time ...`. The whole
command took 8m28s on an idle 2-core machine (506 s of training), longer on
a shared one. See README.md and docs/training.md.
"""

import ml_collections

VARIANTS = ("default", "small", "medium", "mixtral_8x7b", "deepseek")
MODIFIERS = ("dense",)


def _model(**kw) -> ml_collections.ConfigDict:
    """`config.model`: GPT fields (jmoe.model.GPTConfig) + MoE fields (jmoe.MoEConfig)."""
    m = dict(
        vocab_size=256,
        d_model=256,
        num_layers=4,
        num_heads=4,
        num_kv_heads=0,  # 0: = num_heads
        head_dim=0,  # 0: d_model // num_heads
        dense_d_ff=0,  # dense-FFN layers; 0: top_k * d_ff + shared hidden
        moe_every=1,  # MoE FFN in every n-th layer (0: none)
        first_dense_layers=0,
        dense=False,  # replace MoE FFNs by dense FFNs of equal active parameters
        rope_theta=10_000.0,
        norm_eps=1e-6,
        tie_embeddings=False,
        dtype="float32",  # compute dtype ("bfloat16" on GPU/TPU)
        param_dtype="float32",
        scmoe=False,  # ScMoE shortcut-connected MoE: a different model, off by default
        scan_layers=False,  # blocks under one lax.scan per group of layers (docs/scale.md)
        # --- MoE layer (jmoe.MoEConfig) ---
        num_experts=16,
        top_k=2,
        d_ff=256,  # hidden size of one expert
        activation="swiglu",
        router="softmax_topk",
        renormalize=True,
        n_group=0,
        topk_group=0,
        routed_scaling_factor=1.0,
        bias_update_rate=1e-3,
        jitter_eps=0.0,
        dispatch="dropless",
        capacity_factor=1.25,
        min_capacity=4,
        drop_policy="position",
        capacity_scope="shard",  # capacity per token shard (GShard) | batch (as on one device)
        group_align=128,
        num_shared_experts=0,
        shared_d_ff=0,
        shared_gate=False,
        ep_recv_factor=0.0,  # cap on the dropless receive buffer when config.mesh.expert > 1 (0: none)
    )
    m.update(kw)
    return ml_collections.ConfigDict(m)


def _execution(**kw) -> ml_collections.ConfigDict:
    """`config.execution`: how the model runs, never what it computes
    (jmoe.model_config.ModelExecution + jmoe.Execution). Free to change
    between runs of one workdir, like the mesh."""
    e = dict(
        remat="none",  # none | full | dots
        lancet_chunks=1,  # Lancet-style token chunks around each MoE
        fsdp_collective_matmul=False,  # FSDP weight gathers as ppermute rings (needs mesh.fsdp)
        gmm_backend="auto",  # grouped matmul: auto | xla | pallas
        gmm_tiling="auto",  # Pallas grouped-matmul tiles: auto (by shape) | wide | narrow
        # --- expert parallelism (used when config.mesh.expert > 1) ---
        a2a_hierarchy=0,  # devices per node for the two-level all-to-all (0: flat)
        ragged_impl="auto",  # dropless exchange: native ragged all-to-all | dense emulation
        ep_buckets=(1.5, 3.0),  # smaller dropless buffers picked at run time (x balanced load)
        overlap_chunks=1,  # chunks of all-to-all/expert pipelining (Tutel overlap degree)
        collective_matmul=False,  # ring reduce-scatter for expert tensor parallelism
        shadow_experts=0,  # FasterMoE: the step's s hottest experts computed on every device
        capacity_buckets=(1.25, 1.5, 2.0, 3.0),  # dynamic capacity (capacity_factor <= 0): sizes tried
        capacity_layout="auto",  # EP capacity exchange: dense [E,C] | packed (kept rows) | auto
    )
    e.update(kw)
    return ml_collections.ConfigDict(e)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    parts = [p for p in (arg or "default").split(",") if p]
    variant = next((p for p in parts if p not in MODIFIERS), "default")
    for p in parts:
        if p not in VARIANTS + MODIFIERS:
            raise ValueError(f"configs/gpt_moe.py: unknown variant {p!r}; choose from "
                             f"{VARIANTS} plus modifiers {MODIFIERS}.")

    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = _model()
    c.execution = _execution()

    c.data = ml_collections.ConfigDict(dict(
        source="stdlib",  # stdlib | text | tokens
        path="",  # text: file or folder; tokens: .npy / .bin
        glob="*",  # text folder: which files
        dtype="uint16",  # tokens .bin: uint16 | uint32
        val_percent=2.0,  # held-out share (by file for folders and stdlib)
        seq_len=256,
    ))

    c.batch_size = 32  # global, per optimizer step
    c.grad_accum_steps = 1  # micro-batches per step (batch_size must divide)
    c.total_steps = 200
    c.opt = ml_collections.ConfigDict(dict(
        lr=3e-3,
        min_lr_ratio=0.1,  # cosine decays to lr * min_lr_ratio
        warmup_steps=20,
        schedule_steps=-1,  # length of warmup+cosine; -1: total_steps
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=0.1,  # on matrices only (not norms, not biases)
        grad_clip=1.0,  # global-norm clipping (0: off)
    ))
    c.loss = ml_collections.ConfigDict(dict(
        load_balance_weight=0.01,  # x mean over MoE layers of the Switch/GShard loss
        z_loss_weight=1e-3,  # x mean over MoE layers of the router z-loss
    ))

    c.eval_every = 50
    c.eval_batches = 4  # x batch_size x seq_len held-out tokens (32K)
    c.log_every = 10
    c.checkpoint_every = 50
    c.keep_checkpoints = 3
    c.async_checkpointing = True
    c.max_time_s = 0.0  # stop (with a checkpoint) after this much training time; 0: off
    # Faults (docs/reliability.md). By default each stops the run with a
    # message naming the fix; these choose otherwise, deliberately.
    c.on_save_error = "stop"  # a save fails (disk full, permission, I/O): stop | skip (warn, retry next interval)
    c.allow_data_change = False  # resume although the data differ from the checkpoint's fingerprint
    c.restart_if_all_damaged = False  # every checkpoint damaged: set them aside, train from step 0
    c.takeover_lock = False  # take the workdir from the run named in its lock (known to be dead)

    # Online expert re-placement (docs/placement.md): experts and their Adam
    # moments in slot order, re-placed from the recorded loads every N steps.
    c.placement = ml_collections.ConfigDict(dict(
        every=0,  # re-place every N steps; 0: off (static layout)
        spare_slots=0,  # redundant slots per device, for replicas of hot experts
        policy="cost_model",  # cost_model: move when the planner says it pays | always
        hardware="auto",  # planner profile that prices the decision (auto: this GPU, else h100)
    ))

    # Run-time plan switching (docs/adaptive.md): the planner shortlists plans
    # that differ only in how the MoE layers run; the trainer times each on
    # real steps and runs the fastest.
    c.adaptive = ml_collections.ConfigDict(dict(
        plans=0,  # plans to switch among; 0 or 1: off
        trials=2,  # timed steps per plan per timing round
        retime_every=0,  # steps between timing rounds; 0: only at start and on a load shift
        load_shift=0.0,  # re-time when expert loads move this far (total variation); 0: never
        prune=1.5,  # stop timing (this round) a plan slower than 1.5x the fastest; 0: never
    ))

    # Mesh sizes; one may be -1 (the remaining devices). Tokens are sharded
    # over ('data', 'expert'), expert weights over 'expert' (E) and 'tensor' (F).
    c.mesh = ml_collections.ConfigDict(dict(
        data=-1, expert=1, tensor=1,
        fsdp=False,  # ZeRO-3: also shard parameters and Adam moments over 'data'
    ))

    if variant == "small":
        c.model.update(d_model=512, num_layers=8, num_heads=8, num_experts=16, top_k=2,
                       d_ff=512, dtype="bfloat16", scan_layers=True)
        c.data.seq_len = 1024
        c.batch_size = 64
        c.total_steps = 20_000
        c.opt.update(lr=1e-3, warmup_steps=1000)
        c.eval_every = c.checkpoint_every = 1000
    elif variant == "medium":
        c.model.update(d_model=1024, num_layers=16, num_heads=16, num_experts=32, top_k=4,
                       d_ff=512, num_shared_experts=1, shared_d_ff=1024, vocab_size=256,
                       dtype="bfloat16", scan_layers=True)
        c.execution.remat = "dots"
        c.data.seq_len = 2048
        c.batch_size = 256
        c.total_steps = 50_000
        c.opt.update(lr=6e-4, warmup_steps=2000)
        c.eval_every = c.checkpoint_every = 2000
    elif variant == "mixtral_8x7b":
        c.model.update(vocab_size=32_000, d_model=4096, num_layers=32, num_heads=32,
                       num_kv_heads=8, num_experts=8, top_k=2, d_ff=14_336,
                       rope_theta=1e6, norm_eps=1e-5, dtype="bfloat16", group_align=256,
                       scan_layers=True)
        c.execution.remat = "full"
        c.data.update(source="tokens", path="", seq_len=4096)
        c.batch_size = 1024
        c.total_steps = 100_000
        c.opt.update(lr=3e-4, warmup_steps=2000)
        c.mesh.update(data=-1, expert=8)
        c.eval_every = c.checkpoint_every = 1000
    elif variant == "deepseek":
        c.model.update(vocab_size=102_400, d_model=2048, num_layers=28, num_heads=16,
                       num_experts=64, top_k=6, d_ff=1408, num_shared_experts=2,
                       first_dense_layers=1, dense_d_ff=10_944, router="sigmoid_topk",
                       bias_update_rate=1e-3, dtype="bfloat16", group_align=256,
                       scan_layers=True)
        c.execution.remat = "full"
        c.loss.load_balance_weight = 1e-4  # sequence-wise balance is secondary to the bias
        c.data.update(source="tokens", path="", seq_len=4096)
        c.batch_size = 1024
        c.total_steps = 100_000
        c.opt.update(lr=4.2e-4, warmup_steps=2000)
        c.mesh.update(data=-1, expert=8)
        c.eval_every = c.checkpoint_every = 1000

    if "dense" in parts:
        c.model.dense = True
    return c
