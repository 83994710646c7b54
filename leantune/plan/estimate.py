"""Predicted memory and time of one training configuration, from a ModelShape: pure functions.

Peak of a step, as the pieces live and die (bytes):

    peak = weights + trainable + optimizer + max(activations + logits + recompute,  gradients + optimizer step)
           + dequantized weight (4/8-bit base) + runtime (CPU: the measured process baseline)

Backward frees each layer's saved activations as it makes that layer's gradients, so the two never peak
together; the optimizer's own temporaries come after both.

Saved activations per decoder layer (bytes per token; a = compute dtype bytes, h hidden, q/kv the query and
key/value widths, i the MLP width, r the LoRA rank). The terms are Korthikanti et al. 2022 (arXiv 2205.05198)
restated for a pre-norm SwiGLU decoder and for what leantune's modules save (measured with
saved_tensors_hooks, train/memory.py):

    every layer on the gradient path   norms: 4h + 4 each (the fp32 upcast and its rsqrt)
                                       attention: a(2q + 2kv) + 4 heads (q, k, v, output; fp32 logsumexp)
                                       MLP: 3ai (gate, its activation, up)
    full fine-tuning adds              each norm's a*h, and one a-byte input per group of Linears reading it
                                       (q/k/v share one, gate/up share one, down has its own): a(2h + i)
    LoRA adds                          per group of adapted Linears reading one input, that input (a in; the
                                       o_proj input is the attention output, already saved), and x A^T (a r)
                                       per Linear: A and B are cast per call to the activations' dtype
    DoRA adds                          LoRA's, plus two outputs (2a out) per Linear; in fp32 also the in x in
                                       identity it forms B A through (4 in^2 per Linear, the weight-norm path)
    checkpointing keeps                the layer input only (a h), and recomputes one layer in backward;
                                       offloaded (train.checkpoint_offload, on CUDA) those inputs are in host
                                       RAM, counted in `outside["offload_host"]`, not on the device

A quantized base keeps its norms' weights in fp32 but casts their outputs back to the compute dtype
(quant/loader.py norm_outputs_in), so its activations are the 16-bit base's.

Then the chunked loss: the final norm, grad of the hidden states (saved by the loss, a h per token), and
when the head trains its fp32 gradient V x h; the logits live one chunk at a time (c x V, in the compute
dtype: bf16 logits stay bf16).

Full and freeze over a bf16 base train fp32 master weights (train/optim.py MasterWeights): 4 bytes per
trained value counted with the optimizer state, and the optimizer's moments are fp32 (they live on the
masters); the step upcasts the gradients to fp32 first.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from .devices import process_baseline
from .shape import ModelShape, Trainable, input_group

MiB = 2**20
GiB = 2**30

# Linear leaves IA3 scales on the input (feed-forward) side; the rest are scaled on their output.
_FEEDFORWARD = {"down_proj", "fc2", "w2", "dense_4h_to_h", "c_proj"}


@dataclass(frozen=True)
class Setup:
    """One configuration to plan: the fields of a leantune config that move memory or time."""

    method: str = "lora"
    quant: int | None = None        # 4 (QLoRA) or 8 (LLM.int8): the frozen base in bitsandbytes
    double_quant: bool = True
    blocksize: int = 64
    optimizer: str = "adamw"
    checkpointing: bool = False
    offload: bool = False           # train.checkpoint_offload: checkpointed layers' inputs wait in host memory
    batch: int = 4
    seq: int = 1024
    grad_accum: int = 1
    dtype_bytes: int = 2            # 2: bf16 where the device has it; 4: fp32 (CPUs without native bf16)
    loss_chunk: int = 256
    rank: int = 16                  # lora.rank (LoRA, DoRA)
    galore_rank: int = 128
    momentum: float = 0.0
    device: str = "cuda"            # "cuda" (peak = max_memory_allocated) or "cpu" (peak RSS, runtime included)

    def label(self) -> str:
        name = {"lora": "LoRA", "dora": "DoRA", "ia3": "IA3", "full": "full", "freeze": "freeze",
                "prompt": "prompt", "prefix": "prefix", "bottleneck": "bottleneck"}.get(self.method, self.method)
        if self.quant == 4:
            name = ("Q" + name if self.method in ("lora", "dora") else name + " 4-bit") + " nf4" + \
                   (" + dq" if self.double_quant else "")
        elif self.quant == 8:
            name += " 8-bit base"
        if self.optimizer == "galore_adamw":
            name += " + GaLore"
        elif self.optimizer != "adamw":
            name += f" + {self.optimizer}"
        return name


@dataclass
class Estimate:
    setup: Setup
    trainable_params: int
    weights: int
    trainable: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    temporaries: int
    runtime: int
    peak: int
    outside: dict[str, int] = field(default_factory=dict)    # peaks outside the step: device and host
    flops: float = 0.0                                        # per optimizer step
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["setup"]["label"] = self.setup.label()
        return d


def _dq_bits(blocksize: int, double_quant: bool) -> float:
    """Bits per 4-bit weight with its statistics: an fp32 absmax per block, or with double quantization an
    8-bit absmax per block plus an fp32 one per 256 blocks (QLoRA's 4.127 bits at blocksize 64)."""
    return 4 + (8 / blocksize + 32 / (blocksize * 256) if double_quant else 32 / blocksize)


def weight_bytes(shape: ModelShape, s: Setup, trained: Trainable) -> int:
    """The frozen base as stored. A quantized base holds its Linear weights packed (plus each layer's code
    tables), its norms in fp32 and the rest (embeddings, head) in the compute dtype."""
    if s.method == "full":
        return 0
    frozen = shape.total_params - (trained.count if s.method == "freeze" else 0)
    a = s.dtype_bytes
    if s.quant is None:
        return frozen * a
    if s.quant == 4:
        packed = shape.linear_params * _dq_bits(s.blocksize, s.double_quant) / 8
        packed += shape.linear_layers * (2 * 1024 + 4 if s.double_quant else 1024)  # 256-entry fp32 code tables
    else:
        packed = shape.linear_params + 4 * shape.linear_out_rows  # int8 + one fp32 scale per output row
    rest = frozen - shape.linear_params - shape.norm_params
    return int(packed + rest * a + shape.norm_params * 4)


def trainable_elem_bytes(s: Setup) -> int:
    """Adapters keep fp32 master weights over a 16-bit base (PEFT's autocast_adapter_dtype); full and freeze
    train the weights in the base's own dtype."""
    return s.dtype_bytes if s.method in ("full", "freeze") else 4


def masters(s: Setup) -> bool:
    """Full and freeze over a 16-bit base keep fp32 master weights (train/optim.py); adapters are fp32 already."""
    return s.method in ("full", "freeze") and s.dtype_bytes < 4


def optimizer_bytes(s: Setup, trained: Trainable, vocab: int) -> int:
    """State of the optimizer over every trainable tensor (plus the fp32 masters where there are some)."""
    e = 4 if masters(s) else trainable_elem_bytes(s)
    total = 4 * trained.count if masters(s) else 0
    for shp in trained.shapes:
        n = math.prod(shp)
        if s.optimizer == "adamw":
            total += 2 * n * e                      # exp_avg, exp_avg_sq in the parameter's dtype
        elif s.optimizer == "paged_adamw":
            total += 2 * n * 4                      # bitsandbytes' 32-bit state is fp32 whatever the parameter
        elif s.optimizer in ("adamw_8bit", "paged_adamw_8bit"):
            if n < 4096:                            # bitsandbytes' min_8bit_size: small tensors stay fp32
                total += 2 * n * 4
            else:                                   # 1 byte per moment, an fp32 absmax per 256, two code tables
                total += 2 * n + 2 * 4 * math.ceil(n / 256) + 2 * 256 * 4
        elif s.optimizer == "adafactor":
            total += (math.prod(shp[:-1]) + shp[-1]) * e if len(shp) >= 2 else n * e  # factored second moment
        elif s.optimizer == "sgd":
            total += n * e if s.momentum else 0
        elif s.optimizer == "galore_adamw":
            if len(shp) == 2 and vocab not in shp:  # a Linear weight: moments at rank r, plus the projection
                m, k = shp
                r = min(s.galore_rank, m, k)
                total += ((2 * m * r + r * k) if m >= k else (2 * r * k + m * r)) * e
            else:
                total += 2 * n * e
        else:
            raise ValueError(f"unknown optimizer {s.optimizer!r}")
    return total


def _act_bytes(s: Setup) -> int:
    """Bytes of an activation element: the compute dtype's (over a quantized base too, whose fp32 norms
    hand their output back in the compute dtype)."""
    return s.dtype_bytes


def _norms_per_layer(shape: ModelShape) -> int:
    per_layer = (shape.norm_params - shape.hidden) / max(shape.hidden * shape.layers, 1)
    return max(2, round(per_layer))  # Gemma-2 has four (pre/post attention and MLP), most have two


def layer_activation_bytes(shape: ModelShape, s: Setup, trained: Trainable, kind: str) -> tuple[float, float]:
    """(bytes per token, bytes per layer independent of tokens) saved by one decoder layer, for `kind`:
    "full" (its weights train), "frozen" (on the gradient path, nothing of its own trains) or the method."""
    a, h, q, kv, i = _act_bytes(s), shape.hidden, shape.q_width, shape.kv_width, shape.intermediate
    norms = _norms_per_layer(shape)
    per_token = norms * (4 * h + 4) + a * (2 * q + 2 * kv) + 4 * shape.heads + 3 * a * i
    per_layer = 0.0
    if kind == "full":
        return per_token + norms * a * h + a * (2 * h + i), 0.0
    groups: set[str] = set()
    for leaf, fin, fout in trained.adapted:
        if kind in ("lora", "dora"):
            g = input_group(leaf)
            if g not in groups and leaf not in ("o_proj", "dense", "out_proj"):  # o_proj reads the attention output
                per_token += a * fin
            groups.add(g)
            per_token += a * s.rank
            if kind == "dora":
                per_token += 2 * a * fout
                if a == 4:  # the fp32 path forms B A through an identity, which autograd keeps
                    per_layer += 4 * fin * fin + 4 * fin * s.rank
        elif kind == "ia3":
            per_token += a * (fin if leaf in _FEEDFORWARD else fout)
        elif kind == "bottleneck":
            size = _bottleneck_size(trained, shape)
            per_token += 4 * (h + 2 * size)
    return per_token, per_layer


def _bottleneck_size(trained: Trainable, shape: ModelShape) -> int:
    sizes = [shp[0] for shp in trained.shapes if len(shp) == 2 and shp[1] == shape.hidden and shp[0] < shape.hidden]
    return min(sizes) if sizes else 64


def tokens(s: Setup, trained: Trainable) -> int:
    """Positions per micro-batch: rows x (sequence + a prompt method's virtual tokens); packed rows are full."""
    return s.batch * (s.seq + trained.extra_tokens)


def activation_bytes(shape: ModelShape, s: Setup, trained: Trainable) -> tuple[int, int]:
    """(saved activations of one micro-batch, one layer's recomputation when checkpointing)."""
    T = tokens(s, trained)
    a, h = s.dtype_bytes, shape.hidden
    res = _act_bytes(s)
    kind = "full" if s.method in ("full", "freeze") else s.method
    kind = "frozen" if kind in ("prompt", "prefix") else kind
    trained_layers = shape.layers
    if s.method == "freeze":  # layers below the first trained one carry no gradient
        trained_layers = sum(1 for shp in trained.shapes if len(shp) == 2 and shape.vocab not in shp) // 7 or 1
        trained_layers = min(trained_layers, shape.layers)
    per_token, per_layer = layer_activation_bytes(shape, s, trained, kind)
    one_layer = int(per_token * T + per_layer)
    if s.checkpointing:
        saved = trained_layers * res * h * T - offloaded_bytes(shape, s, trained)
        recompute = one_layer
    else:
        saved = trained_layers * one_layer
        recompute = 0
    if s.method == "prefix":  # every layer's keys and values grow by the prefix
        saved += shape.layers * 2 * a * shape.kv_width * s.batch * trained.extra_tokens
    head_trains = s.method == "full"
    saved += T * (4 * h + 4 + (a * h if head_trains else 0))   # final norm
    saved += T * a * h                                           # the loss keeps d(loss)/d(hidden) for backward
    if head_trains:
        saved += 4 * shape.vocab * h + 8 * T                     # the head's fp32 gradient, input ids
    return int(saved), recompute


def offloaded_bytes(shape: ModelShape, s: Setup, trained: Trainable) -> int:
    """The checkpointed layers' inputs that offloaded checkpointing keeps in host RAM (0 on a CPU: already there)."""
    if not (s.checkpointing and s.offload) or s.device == "cpu":
        return 0
    layers = shape.layers
    if s.method == "freeze":
        layers = min(sum(1 for shp in trained.shapes if len(shp) == 2 and shape.vocab not in shp) // 7 or 1, layers)
    return layers * _act_bytes(s) * shape.hidden * tokens(s, trained)


def logits_bytes(shape: ModelShape, s: Setup, trained: Trainable) -> int:
    """One chunk of the chunked loss: the chunk's logits, exponentiated in place, and one more (c, V) working
    tensor (the probabilities' transposed product), in the compute dtype (ops/cross_entropy.py)."""
    c = min(s.loss_chunk, tokens(s, trained))
    return c * shape.vocab * 2 * s.dtype_bytes


def step_flops(shape: ModelShape, s: Setup, trained: Trainable) -> float:
    """FLOPs of one optimizer step: 2 per weight per token forward; backward 2 more for the input gradient
    and 2 for the weight gradient where weights train (6N per token for full, 4N + 6 x adapter for a frozen
    base); causal attention 2 x seq x q-width per layer per token forward, twice that backward;
    checkpointing runs the forward twice."""
    T = tokens(s, trained) * s.grad_accum
    n_mm = shape.linear_params + shape.vocab * shape.hidden  # every matmul weight (the head included)
    attn = 2 * (s.seq + trained.extra_tokens) * shape.q_width * shape.layers  # QK^T and AV, causal half
    fwd = (2 * n_mm + attn) * T
    if s.method == "full":
        total = 3 * fwd
    else:  # backward: input gradients only through the frozen base, plus the trained tensors' own 6n
        total = fwd + (2 * n_mm + 2 * attn) * T + 6 * trained.count * T
    if s.checkpointing:
        total += fwd
    return float(total)


def runtime_bytes(s: Setup) -> int:
    """What the process holds besides the model. On CPU the peak is the resident set: the interpreter, torch,
    transformers (and bitsandbytes where the run uses it), measured once per machine as the RSS of a fresh
    process that imported them and ran a tiny training step (devices.process_baseline); where that cannot
    run, this process's own RSS. On CUDA the peak is max_memory_allocated, which holds no runtime (the CUDA
    context comes on top: see devices.py)."""
    if s.device != "cpu":
        return 0
    measured = process_baseline(bitsandbytes=bool(s.quant) or "8bit" in s.optimizer or s.optimizer.startswith("paged"))
    if measured:
        return measured
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 400 * MiB


def estimate(shape: ModelShape, s: Setup, trained: Trainable, runtime: int | None = None) -> Estimate:
    """Predicted memory of one training step and of the work around it (eval, save, merge, export)."""
    e = trainable_elem_bytes(s)
    weights = weight_bytes(shape, s, trained)
    train_b = trained.count * e
    grads = train_b
    opt = optimizer_bytes(s, trained, shape.vocab)
    acts, recompute = activation_bytes(shape, s, trained)
    logits = logits_bytes(shape, s, trained)
    # torch's foreach AdamW forms the denominators of every tensor at once: one more copy of what it updates
    # (the fp32 masters where there are some, which also take an fp32 copy of the gradients first)
    updated = 4 * trained.count if masters(s) else train_b
    opt_step = updated if s.optimizer in ("adamw", "galore_adamw", "adafactor") else 0
    opt_step += 4 * trained.count if masters(s) else 0
    dequant = shape.largest_quantized * 4 if s.quant else 0  # one weight dequantized per matmul (fp32 worst case)
    temporaries = recompute + dequant
    runtime = runtime_bytes(s) if runtime is None else runtime
    peak = weights + train_b + opt + max(acts + logits + recompute, grads + opt_step) + dequant + runtime
    notes = []
    if s.optimizer.startswith("paged"):
        notes.append("paged optimizer state lives in CUDA unified memory: it moves to host RAM under pressure, "
                     "and max_memory_allocated does not count it")
    if s.method == "dora" and _act_bytes(s) == 4:
        notes.append("DoRA in fp32 keeps an in x in identity per adapted Linear for backward (it forms B A through it): "
                     f"{_human(int(layer_activation_bytes(shape, s, trained, 'dora')[1]) * shape.layers)} "
                     "on this model without checkpointing")
    if shape.experts > 1:
        notes.append(f"MoE: all {shape.experts} experts counted in the weights; activations and FLOPs "
                     "follow the experts a token visits")
    # Outside the step. Eval: no_grad forward with the optimizer state alive; one layer's working set.
    T = tokens(s, trained)
    eval_peak = weights + train_b + opt + T * (3 * shape.intermediate + 4 * shape.hidden) * s.dtype_bytes \
        + logits + dequant + runtime
    outside = {
        "eval_device": eval_peak,
        # a checkpoint copies what trains and the optimizer state to host memory before writing it
        "save_host": train_b + opt + (runtime if s.device == "cpu" else runtime_bytes(replace(s, device="cpu"))),
        # merge folds the adapter into the base in the run's dtype on the host (a QLoRA base dequantized first)
        "merge_host": shape.total_params * s.dtype_bytes + 4 * shape.largest_linear,
        # GGUF export loads the model in float32 and quantizes tensor by tensor
        "export_host": shape.total_params * 4 + 2 * 4 * shape.largest_linear,
    }
    if offloaded_bytes(shape, s, trained):
        outside["offload_host"] = offloaded_bytes(shape, s, trained)  # pinned host RAM during the step
    return Estimate(setup=s, trainable_params=trained.count, weights=weights, trainable=train_b, gradients=grads,
                    optimizer=opt, activations=acts, logits=logits, temporaries=temporaries, runtime=runtime,
                    peak=int(peak), outside=outside, flops=step_flops(shape, s, trained), notes=notes)


def _human(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / MiB:.0f} MiB"

