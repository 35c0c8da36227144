r"""Fine-tune an imported Hugging Face MoE checkpoint on text with the trainer.

  python train.py --config configs/hf_finetune.py \
      --config.hf.path=path/to/hf_dir --config.data.path=corpus.txt --workdir runs/ft

`config.hf.path`: a Mixtral, Qwen2-MoE, Qwen3-MoE, GPT-OSS or DeepSeek-V3
directory (config.json, *.safetensors, tokenizer.json). `config.data.path`:
a text file (split by position) or a folder of them (split by file, files
matching `config.data.glob`), tokenised with the checkpoint's tokenizer.json
(`data.source="tokens"` takes ids already made with it). The same loop as
configs/gpt_moe.py (jmoe.train): expert parallelism (`config.mesh.expert`),
FSDP (`config.mesh.fsdp`), Orbax checkpoints with resume (rerun the same
command), metrics.jsonl / TensorBoard, an eval split. When the run ends the
weights are written back as an HF directory, `<workdir>/hf` (also every
`config.hf.export_every` steps), which transformers and `jmoe.hf.load` read.

A try-out on the committed tiny random-weight Mixtral (no download):

  python train.py --config configs/hf_finetune.py \
      --config.hf.path=tests/fixtures/hf/mixtral --config.data.path=README.md \
      --config.data.seq_len=16 --config.total_steps=6 --config.opt.lr=1e-2 \
      --config.opt.warmup_steps=0 --config.eval_every=3 \
      --workdir /tmp/ft

took 48 s on a shared 2-core CPU: train loss 5.98 at step 1, about 0.4 at
step 6 (the fixture's 96-token tokenizer turns most of README.md into a few
ids, so it is easy text), then `exported step 6's weights as an HF
checkpoint to /tmp/ft/hf` and `done: step 6 ...`.

Not for HF models (refused before compiling, naming the field): online
expert re-placement (`config.placement`), adaptive plans (`config.adaptive`),
expert tensor parallelism (`config.mesh.tensor`). The GPT's model and
execution fields (`config.model`, `config.execution`) do not exist here:
the architecture is the checkpoint's. See docs/huggingface.md.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in (None, "", "default"):
        raise ValueError(f"configs/hf_finetune.py: unknown variant {arg!r}; it has none.")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.hf = ml_collections.ConfigDict(dict(
        path="",  # the HF checkpoint directory to start from
        param_dtype="float32",  # parameters and Adam moments ("bfloat16" halves them)
        dtype="",  # compute dtype; "": = param_dtype
        group_align=8,  # the MoE layer's dropless group alignment (128 on GPU)
        bias_update_rate=0.0,  # DeepSeek-V3: aux-loss-free update of the selection bias; 0: frozen
        export_every=0,  # also export every N steps; 0: only when the run ends
        export_dir="",  # "": <workdir>/hf
    ))
    c.data = ml_collections.ConfigDict(dict(
        source="text",  # text (through tokenizer.json) | tokens (pre-tokenised) | stdlib
        path="",  # text: a file or a folder; tokens: .npy / .bin
        glob="*",  # text folder: which files
        dtype="uint32",  # tokens .bin: uint16 | uint32
        val_percent=5.0,  # held-out share (by file for folders)
        seq_len=256,
    ))
    c.batch_size = 8
    c.grad_accum_steps = 1
    c.total_steps = 200
    c.opt = ml_collections.ConfigDict(dict(
        lr=1e-5, min_lr_ratio=0.1, warmup_steps=10, schedule_steps=-1,
        b1=0.9, b2=0.95, eps=1e-8,
        weight_decay=0.0,  # on matrices only
        grad_clip=1.0,
    ))
    c.loss = ml_collections.ConfigDict(dict(
        load_balance_weight=0.01,  # x mean over MoE layers (Mixtral trained with 0.02)
        z_loss_weight=0.0,
    ))
    c.eval_every = 50
    c.eval_batches = 4
    c.log_every = 10
    c.checkpoint_every = 50
    c.keep_checkpoints = 3
    c.async_checkpointing = True
    c.max_time_s = 0.0
    c.on_save_error = "stop"
    c.allow_data_change = False
    c.restart_if_all_damaged = False
    c.takeover_lock = False
    # Present so that turning them on is refused with the reason (see above).
    c.placement = ml_collections.ConfigDict(dict(every=0, spare_slots=0, policy="cost_model",
                                                 hardware="auto"))
    c.adaptive = ml_collections.ConfigDict(dict(plans=0, trials=2, retime_every=0,
                                                load_shift=0.0))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, expert=1, tensor=1, fsdp=False))
    return c
