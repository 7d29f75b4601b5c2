"""`qllava plan --trace`: the real training step of a stage, run on fake tensors, its live memory counted.

The model is built as training builds it (the same builder functions, quantization config, LoRA targets and
dtypes) but from the recipe's configs alone: under torch's FakeTensorMode every tensor has a shape, a dtype and a
device (a fake `cuda` one by default) and no data, so 7B shapes cost seconds and no memory. The worst-case
micro-batch the recipe allows (rows packed to max_seq_len, as many of the largest images as fit) goes through
qllava's collator, then two optimizer steps run through the trainer's own training_step (the first creates the
optimizer states, the second is the steady state).

Memory is counted by LiveBytes, a TorchDispatchMode that registers every storage an operator returns and sees it
freed through a weak reference: the peak of live bytes, what was alive at that moment (by category) and the
operator that reached it. The same tracker runs on real tensors (`trace_stage(..., real=True)`): the tests hold
the fake trace to real CPU execution. What no trace can see is added as named allowances (ALLOWANCE_SOURCES).
FLOPs are counted per operator with FlopCounterMode's formulas, split into forward, backward and recomputation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from . import model as modeling
from .plan import card_allowances
from .recipe import Recipe

GIB = 2**30
STEPS = 2
CATEGORIES = (
    "quantized_weights",
    "frozen_weights",
    "trainable_weights",
    "gradients",
    "optimizer_states",
    "batch",
    "saved_activations",
    "transient_at_peak",
)
# What a trace of tensors cannot see, on a CUDA card. Each value is an allowance, not a measurement.
ALLOWANCE_SOURCES = {
    "cuda_context": "CUDA context and kernel images, outside torch's allocator: 0.3-1 GiB by card and driver "
    "(lazy module loading); the plan's 1 GiB",
    "cublas_workspace": "cuBLAS workspace per handle, 32 MiB on Hopper (torch's CUBLAS_WORKSPACE_CONFIG default "
    ":4096:8), one for the forward thread and one for autograd's: 64 MiB",
    "allocator_rounding": "the caching allocator rounds each block up to 512 bytes: 512 B per storage alive at the "
    "peak",
    "fragmentation": "reserved beyond allocated in the caching allocator's pools: 5% of the traced peak, assumed "
    "(not yet measured on a GPU: benchmarks/gpu_check.py prints reserved vs allocated)",
    "flash_attn_workspace": "flash-attn's varlen backward allocates dq_accum (float32, (tokens + 128 x rows) x heads "
    "x head_dim) and softmax_d inside the kernel, once per layer at a time",
}


# Epoch time estimates: dense bf16 tensor-core peaks (TFLOP/s) and the share of it a QLoRA step is assumed to reach
# (4-bit dequantization, recomputation and small LoRA matmuls keep it well below dense training's).
CARDS_TFLOPS = {"RTX 4090": 165.0, "A100-40GB": 312.0, "H100": 989.0}
UTILISATION = 0.35
# When a stage's data are not prepared on this machine: LLaVA-1.5's mixes, per sample, as prepared by qllava
# (576 image tokens + the text; `qllava data stats` on a 665K-shaped mix: image tokens ~80% of the tokens).
MIX_AVERAGES = {"stage1": ("LCS-558K", 558_128, 600), "stage2": ("llava_v1_5_mix665k", 665_298, 675)}


class TraceError(RuntimeError):
    """The trace met an operator it cannot run on fake tensors (named in the message)."""


# ---------------------------------------------------------------------------------------------------------------
# Counting live storages


@dataclass
class Counts:
    """What a tracked run measured."""

    peak_bytes: int = 0
    peak_op: str = ""
    peak_phase: str = ""
    peak_step: int = 0
    peak_storages: int = 0
    breakdown: dict = field(default_factory=dict)
    flops: dict = field(default_factory=lambda: {"forward": 0, "backward": 0, "recompute": 0})


class LiveBytes(TorchDispatchMode):
    """Live bytes of every storage registered (resident tensors) or returned by an operator run under it.

    A storage is alive until its weak reference expires, so views and in-place results are never counted twice.
    Each storage is tagged with the phase it was born in; at the end, the storages alive at the peak are sorted
    into CATEGORIES by the sets of known storages (weights, gradients, optimizer states, batch, saved tensors).
    """

    def __init__(self, scalars=None):
        super().__init__()
        self.live: dict[StorageWeakRef, int] = {}
        self.born: dict[StorageWeakRef, str] = {}
        self.known: dict[str, set] = {name: set() for name in CATEGORIES}
        self.current = 0
        self.phase = "setup"
        self.step = 0
        self.counts = Counts()
        self.at_peak: dict[StorageWeakRef, int] = {}
        self.peak_len: int | None = None
        self.scalars = scalars
        self.label_tokens = 0
        self.bool_index_sites: set[str] = set()
        self.autocast = None
        import bitsandbytes  # noqa: F401 (registers its operators)
        from torch.utils.flop_counter import FlopCounterMode

        self.flop_registry = dict(FlopCounterMode(display=False).flop_registry)
        self.flop_registry[torch.ops.bitsandbytes.gemm_4bit] = gemm_4bit_flops
        self.forward_only = {torch.ops.bitsandbytes.gemm_4bit}
        # torch's formulas know the CUDA attention kernels, not the CPU one the traced step runs
        self.flop_registry[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _flash_flops
        self.flop_registry[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward] = _flash_backward_flops

    def register(self, tensor: torch.Tensor, category: str | None = None) -> None:
        key = _key(tensor)
        if key is None:
            return
        if key not in self.live:
            self.live[key] = tensor.untyped_storage().nbytes()
            self.born[key] = self.phase
            self.current += self.live[key]
        if category:
            self.known[category].add(key)

    def mark(self, tensor: torch.Tensor, category: str) -> None:
        """Remember a storage as belonging to `category` (it is counted once, wherever it was born)."""
        key = _key(tensor)
        if key is not None:
            self.known[category].add(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default and _is_fake(args[0]):
            return self.scalars(func, args[0], self.step) if self.scalars else _unknown(func)
        out = self._bool_index(func, args) if func is torch.ops.aten.index.Tensor else None
        out = func(*args, **kwargs) if out is None else out
        self._count_flops(func, out, args, kwargs)
        for t in _tensors(out):
            self.register(t)
        # `current` counts storages freed since the last sweep too: an upper bound. Only when it passes the peak can
        # the true count have: then sweep, and a count still above is a new peak.
        if self.current > self.counts.peak_bytes:
            self._sweep()
            if self.current > self.counts.peak_bytes:
                self._new_peak(func)
        return out

    def _bool_index(self, func, args):
        """x[mask] with a fake boolean mask at a known site (bool_index_sites): its size is the micro-batch's label
        count (the mask is the labels' mask); elsewhere None (the fake mode raises, naming the operator)."""
        x, indices = args
        mask = next((i for i in indices if i is not None and i.dtype == torch.bool), None)
        if mask is None or not _is_fake(mask) or not self.bool_index_sites:
            return None
        frame = sys._getframe(2)
        while frame and frame.f_code.co_name not in self.bool_index_sites:
            frame = frame.f_back
        if frame is None:
            return None
        return x.new_empty((self.label_tokens, *x.shape[mask.dim() :]))

    def add_flops(self, flops: int) -> None:
        """FLOPs of work done where no operator runs (a kernel the trace stands in for)."""
        if self.step == STEPS and self.phase in ("forward", "backward"):
            part = self.phase
            self.counts.flops[part] += flops

    def _count_flops(self, func, out, args, kwargs) -> None:
        packet = func._overloadpacket
        if packet not in self.flop_registry:
            return
        flops = self.flop_registry[packet](*args, **kwargs, out_val=out)
        if self.step != STEPS:  # the steady step is the one counted
            return
        if self.phase == "backward":
            # Checkpointing re-runs a layer's forward inside the backward, with grad mode on (backward kernels run
            # without); bitsandbytes' fused 4-bit matmul is a forward-only operator, run inside its autograd
            # Function (grad mode off).
            part = "recompute" if torch.is_grad_enabled() or packet in self.forward_only else "backward"
        elif self.phase == "forward":
            part = "forward"
        else:
            return
        self.counts.flops[part] += flops

    def _new_peak(self, func) -> None:
        """At a peak, `live` is exact (just swept); nothing leaves it before the next sweep and what comes is appended,
        so its first `peak_len` entries are the storages alive at the peak, copied out at that sweep (a rising run of
        peaks costs one copy)."""
        self.counts.peak_bytes = self.current
        self.counts.peak_op = str(func)
        self.counts.peak_phase = self.phase
        self.counts.peak_step = self.step
        self.peak_len = len(self.live)

    def _sweep(self) -> None:
        if self.peak_len is not None:
            self.at_peak = dict(itertools.islice(self.live.items(), self.peak_len))
            self.peak_len = None
        dead = [k for k in self.live if k.expired()]
        for k in dead:
            self.current -= self.live.pop(k)

    def breakdown(self) -> dict[str, int]:
        """The storages alive at the peak, by category: a storage goes to the first category that knows it, else to
        saved activations (born in an earlier phase than the peak's) or transient buffers (born in the peak's)."""
        self._sweep()
        parts = dict.fromkeys(CATEGORIES, 0)
        for key, nbytes in self.at_peak.items():
            category = next((c for c in CATEGORIES if key in self.known[c]), None)
            if category is None:
                same_phase = self.born.get(key) == self.counts.peak_phase
                category = (
                    "transient_at_peak"
                    if same_phase and key not in self.known["saved_activations"]
                    else "saved_activations"
                )
            parts[category] += nbytes
        return parts


def gemm_4bit_flops(a, b, shape, *args, out_val=None, **kwargs) -> int:
    """bitsandbytes' fused 4-bit matmul (forward of a Linear4bit): A (M x K) times the (N x K) weight."""
    return 2 * (a.numel() // a.shape[-1]) * shape[0] * shape[1]


def _key(tensor) -> StorageWeakRef | None:
    if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
        return None
    try:
        return StorageWeakRef(tensor.untyped_storage())
    except (RuntimeError, NotImplementedError):
        return None


def _tensors(out):
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (tuple, list)):
        for item in out:
            yield from _tensors(item)


def _is_fake(tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(tensor, FakeTensor)


def _unknown(func):
    raise TraceError(f"the trace cannot run {func} (a value read from a tensor's data) at {_caller()}")


def _caller() -> str:
    """The innermost frame outside torch: where a data-dependent operator was called from."""
    frame = sys._getframe(2)
    while frame and any(part in frame.f_code.co_filename for part in ("/torch/_", "/torch/utils/", "trace.py")):
        frame = frame.f_back
    return f"{frame.f_code.co_filename}:{frame.f_lineno} ({frame.f_code.co_name})" if frame else "?"


# Where the training step reads a value out of a tensor, and what the trace answers there. Each is a check or a
# logged metric, never a size: a count check the collator already guarantees, TRL's logged token accuracy and
# entropy, transformers' "are these rows packed" test (they are: the worst-case batch packs several samples a row).
SCALAR_SITES = {
    "torch_compilable_check": True,  # transformers' get_placeholder_mask: image tokens == image features
    "compute_loss": 1,  # TRL's metrics (num_valid > 0, entropy, token accuracy)
    "find_packed_sequence_indices": False,  # "(packed_sequence_mask[:, -1] == 0).all()": not all single sequences
    "clip_grad_norm_": 1.0,
    "_get_unpad_data": 1,  # flash-attention's max sequence length (the kernel's tiling, no output shape)
    "prepare_fa_kwargs_from_position_ids": 1,
    "_is_packed_sequence": True,
}


def scalar_at_site(func, tensor, step: int):
    """The stand-in value of a data-dependent read at a known site (SCALAR_SITES), else a TraceError naming it.
    torch's own optimizers read their step count (the optimizer step being traced)."""
    frame = sys._getframe(1)
    while frame:
        if frame.f_code.co_name == "_get_value" and frame.f_code.co_filename.endswith("optim/optimizer.py"):
            return float(step)
        name = frame.f_code.co_name
        if name in SCALAR_SITES and "/torch/" not in frame.f_code.co_filename:
            value = SCALAR_SITES[name]
            return type(value)(value) if tensor.dtype != torch.bool else bool(value)
        frame = frame.f_back
    raise TraceError(f"the trace cannot run {func} (a value read from a tensor's data) at {_caller()}")


# ---------------------------------------------------------------------------------------------------------------
# The model, built from configs on fake tensors


def fake_stage_model(recipe: Recipe, stage: str, device: str, fake):
    """(model, processor) of a stage as train.build_stage_model makes it, from configs only. The structure is built on
    the meta device by the builder's own functions (empty_base_model, frozen, attach_lora, the projector made
    trainable, trainable weights in float32), the decoder's linear layers quantized by bitsandbytes' quantize_4bit
    (its meta kernels); then, under the fake mode, every tensor becomes an empty fake one on `device`."""
    from . import train

    cfg = recipe.model
    processor = stage_processor(cfg)
    dtype = getattr(torch, cfg.dtype)
    attn = (
        modeling.attention_implementation(cfg.attn_implementation, dtype)
        if device == "cpu"
        else _cuda_attention(cfg.attn_implementation, dtype)
    )
    # transformers refuses to build a flash_attention_2 model where flash-attn cannot import: build with sdpa, then
    # name the implementation the card runs (the trace's stand-in serves it: flash_attention_stand_in)
    buildable = dataclasses.replace(recipe, model=dataclasses.replace(cfg, attn_implementation="sdpa"))
    model = modeling.empty_base_model(buildable, processor, cfg.dtype)
    for module in model.modules():
        if hasattr(module, "config") and hasattr(module.config, "_attn_implementation"):
            module.config._attn_implementation = attn
    if recipe.quantization.load_in_4bit:
        _quantize(model.model.language_model, recipe.quantization)
    model = modeling.frozen(model)
    if stage == "stage2":
        model = modeling.attach_lora(model, recipe.lora)
    for parameter in modeling.projector_parameters(model).values():
        parameter.requires_grad_(True)
    train._trainable_to_float32(model)
    with fake:
        _materialize(model, "cpu")  # fake tensors on the CPU device: see card_paths for why not a fake "cuda" one
    return model, processor


def stage_processor(cfg):
    """The processor training builds; when the decoder's tokenizer is not on this machine (a plan needs no download),
    a stand-in with the same vocabulary size, image token id and pad token kind: the trace needs those numbers only."""
    if modeling.local_folder(cfg.llava or cfg.decoder) is None:  # not here: never a hub request (or its retries)
        return offline_processor(cfg)
    try:
        return modeling.build_processor(cfg)
    except OSError:
        return offline_processor(cfg)


def offline_processor(cfg):
    """A processor whose tokenizer has the checkpoint's vocabulary size, <unk> (id 0, LLaVA's pad) and the image
    token where training puts it: appended to the decoder's vocabulary, or at a llava checkpoint's image_token_id."""
    from tokenizers import Tokenizer, models
    from transformers import LlavaNextProcessor, LlavaProcessor, PreTrainedTokenizerFast

    from . import vision

    config = modeling.load_llava_config(cfg)
    image_id = config.image_token_id if cfg.llava else config.text_config.vocab_size
    words = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, image_id)}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="<unk>")),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<unk>",
    )
    tokenizer.add_tokens([modeling.IMAGE_TOKEN], special_tokens=True)
    image_processor = modeling.build_image_processor(cfg)
    height, width = vision.output_size(image_processor)
    prefix = vision.prefix_tokens(config.vision_config, height, width, cfg.vision_feature_layer)
    kind = LlavaNextProcessor if config.model_type == "llava_next" else LlavaProcessor
    return kind(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        num_additional_image_tokens=prefix,
        image_token=modeling.IMAGE_TOKEN,
    )


def _cuda_attention(requested: str, dtype: torch.dtype) -> str:
    """What "auto" means on a CUDA card (modeling.attention_implementation asks this machine, which has no card):
    flash_attention_2 when flash-attn is installed there; the trace assumes the sdpa fallback unless asked."""
    return "sdpa" if requested == "auto" else requested


def _materialize(module: torch.nn.Module, device: str) -> None:
    """Every meta parameter, buffer and 4-bit quantization state replaced by an empty tensor on `device` (fake under
    the trace's mode); a parameter shared by two modules (tied embeddings) stays shared."""
    done = {}

    def empty(t):
        return torch.empty(t.shape, dtype=t.dtype, device=device)

    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is None or p.device.type != "meta":
                continue
            if id(p) not in done:
                new = torch.nn.Parameter(empty(p), requires_grad=p.requires_grad)
                for attr in (
                    "quant_state",
                    "quant_type",
                    "compress_statistics",
                    "blocksize",
                    "bnb_quantized",
                    "quant_storage",
                ):
                    if hasattr(p, attr):
                        setattr(new, attr, getattr(p, attr))
                done[id(p)] = new
            sub._parameters[name] = done[id(p)]
        for name, b in list(sub._buffers.items()):
            if b is not None and b.device.type == "meta":
                sub._buffers[name] = empty(b)
        state = getattr(sub, "quant_state", None)
        for s in (state, getattr(state, "state2", None)):
            for attr, value in list(vars(s).items()) if s is not None else ():
                if isinstance(value, torch.Tensor) and value.device.type == "meta":
                    setattr(s, attr, done.setdefault(id(value), empty(value)))  # code tables are shared


def _quantize(decoder, q) -> None:
    """The decoder blocks' linear layers as bitsandbytes Linear4bit, quantized with quantize_4bit as loading does.
    The packed weight is a plain Parameter carrying quant_state (bitsandbytes' Params4bit cannot wrap a fake tensor);
    Linear4bit's forward and backward read exactly these."""
    import bitsandbytes as bnb

    compute = getattr(torch, q.bnb_4bit_compute_dtype)
    cached = dict(bnb.functional.name2qmap)  # bitsandbytes caches its code tables on the first device it sees
    try:
        _quantize_layers(decoder, q, compute)
    finally:
        bnb.functional.name2qmap.clear()
        bnb.functional.name2qmap.update(cached)


def _quantize_layers(decoder, q, compute) -> None:
    import bitsandbytes as bnb

    for parent in list(decoder.layers.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            with torch.device("meta"):
                layer = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=compute,
                    compress_statistics=q.bnb_4bit_use_double_quant,
                    quant_type=q.bnb_4bit_quant_type,
                    device="meta",
                )
            packed, state = bnb.functional.quantize_4bit(
                child.weight.data.to(compute),
                blocksize=64,
                compress_statistics=q.bnb_4bit_use_double_quant,
                quant_type=q.bnb_4bit_quant_type,
            )
            weight = torch.nn.Parameter(packed, requires_grad=False)  # on meta: shapes only
            weight.quant_state, weight.quant_type = state, q.bnb_4bit_quant_type
            weight.compress_statistics, weight.blocksize, weight.bnb_quantized = q.bnb_4bit_use_double_quant, 64, True
            weight.quant_storage = torch.uint8
            layer._parameters["weight"] = weight
            layer.quant_state = state
            if child.bias is not None:
                layer._parameters["bias"] = child.bias
            setattr(parent, name, layer)


def quant_state_tensors(state) -> list[torch.Tensor]:
    """The tensors a bitsandbytes QuantState holds (absmax, code, offset, and its nested state's)."""
    if state is None:
        return []
    found = [v for v in vars(state).values() if isinstance(v, torch.Tensor)]
    return found + quant_state_tensors(getattr(state, "state2", None))


# ---------------------------------------------------------------------------------------------------------------
# The worst-case micro-batch


def worst_case_samples(recipe: Recipe, stage: str, model, processor, folder: Path, rows: int | None = None):
    """(dataset, image store) of rows that fill max_seq_len, each with as many of the largest images as fit (one per
    sample, a few text tokens each, every text token trained), the rest of the row one text sample: enough rows for
    every micro-batch of both steps (or `rows`)."""
    import datasets
    from PIL import Image

    from . import vision
    from .data import FEATURES, ImageStore

    cfg = getattr(recipe, stage)
    geometry = modeling.image_geometry(model.config, processor.image_processor)
    size = (
        max(max(p) for p in geometry.grid_pinpoints)
        if geometry.varies
        else vision.output_size(processor.image_processor)[0]
    )
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (120, 60, 200)).save(images / "0.png")
    n_image = geometry.tokens_of((size, size))
    text = 16
    per_row = cfg.max_seq_len // (n_image + text) if n_image + 2 <= cfg.max_seq_len else 0
    rest = cfg.max_seq_len - per_row * (n_image + text)
    rng = random.Random(0)
    vocab = min(model.config.text_config.vocab_size, len(processor.tokenizer)) - 1
    image_id = model.config.image_token_id
    specials = {image_id, processor.tokenizer.pad_token_id}
    columns = {name: [] for name in FEATURES}

    def words(n):
        return [t for t in (rng.randrange(3, vocab) for _ in range(3 * n)) if t not in specials][:n]

    def add(ids, image, image_tokens):
        labels = [-100 if t == image_id else t for t in ids]
        length = len(ids) - (1 if image else 0) + image_tokens
        for key, value in (
            ("id", str(len(columns["id"]))),
            ("input_ids", ids),
            ("labels", labels),
            ("length", length),
            ("source", 0),
            ("image", "0.png" if image else ""),
            ("image_tokens", [image_tokens] if image else []),
            ("image_file", ""),
            ("image_stamp", 0),
        ):
            columns[key].append(value)

    for _ in range(rows or cfg.per_device_train_batch_size * (STEPS + 1)):
        for _ in range(per_row):
            add([image_id] + words(text), True, n_image)
        if rest >= 2:
            add(words(rest), False, 0)
    return datasets.Dataset.from_dict(columns, features=FEATURES), ImageStore([str(images)])


def micro_batches(recipe: Recipe, stage: str, model, processor, folder: Path) -> tuple[list[dict], object]:
    """The collator's batches of the worst-case rows (one per optimizer step) and the collator."""
    from .packing import Collator, Rows

    cfg = getattr(recipe, stage)
    dataset, images = worst_case_samples(recipe, stage, model, processor, folder)
    rows = Rows(dataset, cfg.max_seq_len, cfg.packing, cfg.seed)
    collator = Collator(
        images,
        processor.image_processor,
        cfg.image_aspect_ratio,
        processor.tokenizer.pad_token_id,
        model.config.image_token_id,
        packing=cfg.packing,
        flatten=model.config._attn_implementation == "flash_attention_2",
    )
    order = sorted(range(len(rows)), key=lambda i: -sum(s["length"] for s in rows[i]))
    size = cfg.per_device_train_batch_size
    batches = [collator([rows[i] for i in order[k * size : (k + 1) * size]]) for k in range(STEPS)]
    return batches, (rows, collator)


# ---------------------------------------------------------------------------------------------------------------
# The trace


def trace_stage(recipe: Recipe, stage: str, device: str = "cuda", real: bool = False) -> dict:
    """Peak live bytes (with breakdown, operator at the peak), allowances, FLOPs per token and tokens per step of
    two optimizer steps of `stage`. `real`: load the real model (its weights) and execute on CPU instead, counted by
    the same tracker (what the tests compare the trace with)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from . import train

    started = time.perf_counter()
    cfg = getattr(recipe, stage)
    fake = None if real else FakeTensorMode(allow_non_fake_inputs=True)
    if real and device != "cpu":
        raise ValueError("real execution is on CPU only (device='cpu')")
    with tempfile.TemporaryDirectory(prefix="qllava_trace_") as work, _quiet(), _trace_patches(real):
        if real:
            model, processor = train.build_stage_model(recipe, stage)
        else:
            model, processor = fake_stage_model(recipe, stage, device, fake)
        batches, (rows, collator) = micro_batches(recipe, stage, model, processor, Path(work))
        tokens = int(batches[0]["qllava_real_tokens"])
        label_tokens = [int((b["labels"] != -100).sum()) for b in batches]
        trainer = _trainer(recipe, stage, model, processor, rows, collator, Path(work), device, fake)
        tracker = LiveBytes(scalars=scalar_at_site)
        with fake or contextlib.nullcontext(), tracker:
            _register_resident(tracker, model)
            try:
                flash = model.config._attn_implementation == "flash_attention_2" and not real
                with (
                    card_paths(device == "cuda", tracker, recipe.model.dtype),
                    flash_attention(tracker) if flash else contextlib.nullcontext(),
                ):
                    _steps(trainer, tracker, batches, label_tokens, fake)
            except TraceError:
                raise
            except Exception as e:
                if type(e).__name__ in (
                    "DataDependentOutputException",
                    "DynamicOutputShapeException",
                    "UnsupportedOperatorException",
                ):
                    raise TraceError(f"the trace cannot run {e.args[0] if e.args else e} at {_caller()}") from None
                raise
    counts = tracker.counts
    counts.breakdown = tracker.breakdown()
    counts.peak_storages = len(tracker.at_peak)
    text = model.config.text_config
    attn = model.config._attn_implementation
    allowances = allowances_bytes(device, counts, text, batches[0]["input_ids"].shape, attn)
    return {
        "stage": stage,
        "device": device,
        "real": real,
        "traced_peak_bytes": counts.peak_bytes,
        "breakdown": counts.breakdown,
        "op_at_peak": {"op": counts.peak_op, "phase": counts.peak_phase, "step": counts.peak_step},
        "allowances_bytes": allowances,
        "allowance_sources": {k: ALLOWANCE_SOURCES[k] for k in allowances},
        "peak_with_allowances_bytes": counts.peak_bytes + sum(allowances.values()),
        "flops_per_token": {k: v / tokens for k, v in counts.flops.items()},
        "flops_per_step_micro_batch": dict(counts.flops),
        "tokens_per_step": tokens * cfg.gradient_accumulation_steps,
        "tokens_per_micro_batch": tokens,
        "label_tokens_per_micro_batch": label_tokens[0],
        "attn_implementation": model.config._attn_implementation,
        "epoch": _epoch(recipe, stage, processor, model, counts.flops, tokens),
        "trace_seconds": round(time.perf_counter() - started, 2),
    }


def epoch_tokens(recipe: Recipe, stage: str, processor, geometry) -> tuple[int, str]:
    """(tokens of one epoch, where the figure comes from): the prepared-data cache's count when the stage's data are
    prepared on this machine, else LLaVA-1.5's mix at its per-sample average (MIX_AVERAGES)."""
    try:
        import json

        from .data import image_source
        from .data.prepare import _cache_key, _cache_still_true
        from .tokenizer import IMAGE_TOKEN

        cfg = getattr(recipe, stage)
        sources = [image_source(path, cfg.image_folder) for path in cfg.data]
        key = _cache_key(
            cfg, sources, processor.tokenizer, processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), geometry
        )
        folder = Path(recipe.data.cache_dir or Path.home() / ".cache" / "qllava") / "tokenized" / key
        if _cache_still_true(folder, sources):
            return int(json.loads((folder / "report.json").read_text())["tokens"]), f"prepared data ({folder})"
    except Exception:  # data not on this machine, or not prepared: the mix's averages
        pass
    name, samples, per_sample = MIX_AVERAGES[stage]
    return int(
        samples * per_sample * getattr(recipe, stage).num_train_epochs
    ), f"{name}: {samples:,} samples x ~{per_sample} tokens (not prepared here)"


def epoch_hours(tokens: int, flops_per_token: dict) -> dict[str, float]:
    """Hours for `tokens` at the traced FLOPs per token (forward + backward + recompute), per card, at UTILISATION."""
    per_token = sum(flops_per_token.values())
    return {
        card: round(tokens * per_token / (tflops * 1e12 * UTILISATION) / 3600, 1)
        for card, tflops in CARDS_TFLOPS.items()
    }


def _epoch(recipe, stage, processor, model, flops: dict, tokens: int) -> dict:
    total, source = epoch_tokens(
        recipe, stage, processor, modeling.image_geometry(model.config, processor.image_processor)
    )
    hours = epoch_hours(total, {k: v / tokens for k, v in flops.items()})
    return {
        "tokens": total,
        "tokens_source": source,
        "utilisation": UTILISATION,
        "hours": hours,
        "label": f"estimate at {UTILISATION:.0%} of each card's dense bf16 peak",
    }


def allowances_bytes(device: str, counts: Counts, text, shape, attn: str) -> dict[str, int]:
    """What a card adds to the traced peak (none on CPU, where the tracker's count is the whole story)."""
    if device == "cpu":
        return {}
    parts = card_allowances(counts.peak_bytes) | {"allocator_rounding": 512 * counts.peak_storages}
    if attn == "flash_attention_2":
        rows, width = shape
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        parts["flash_attn_workspace"] = 4 * (rows * width + 128 * rows) * text.num_attention_heads * math.ceil(
            head_dim / 32
        ) * 32 + 4 * rows * text.num_attention_heads * (math.ceil(width / 128) * 128)
    return parts


def _trainer(recipe, stage, model, processor, rows, collator, work: Path, device: str, fake):
    """The stage's trainer, built by train._build_trainer as training builds it. On a fake CUDA device the optimizer
    is the one a card gets (fused AdamW) and the model stays where it is (the trainer would move it to this CPU)."""
    from transformers import Trainer

    from . import train

    cfg = getattr(recipe, stage)
    build = train.build_optimizer
    card = device == "cuda"
    original = torch.cuda.is_available

    def optimizer_for_device(model, cfg):
        torch.cuda.is_available = (lambda: True) if card else original
        try:
            return build(model, cfg)
        finally:
            torch.cuda.is_available = original

    move = Trainer._move_model_to_device
    train.build_optimizer, Trainer._move_model_to_device = optimizer_for_device, lambda *a, **k: None
    try:
        trainer = train._build_trainer(model, processor, rows, collator, cfg, work / "checkpoints", [], 0)
    finally:
        train.build_optimizer, Trainer._move_model_to_device = build, move
    if cfg.gradient_checkpointing:  # what Trainer.train does before its first step
        trainer.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    train._trainable_to_float32(model)
    return trainer


def _register_resident(tracker: LiveBytes, model) -> None:
    """Everything the model holds before the first step, in its category."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            tracker.register(module.weight, "quantized_weights")
            for t in quant_state_tensors(module.weight.quant_state):
                tracker.register(t, "quantized_weights")
    for p in model.parameters():
        tracker.register(p, "trainable_weights" if p.requires_grad else "frozen_weights")
    for b in model.buffers():
        tracker.register(b, "frozen_weights")


def _steps(trainer, tracker: LiveBytes, batches, label_tokens, fake) -> None:
    """Two optimizer steps as the trainer's loop takes them: training_step (forward, loss, backward) on the
    micro-batch, gradient clipping, the optimizer's step, the scheduler's, gradients set to None."""
    model, optimizer = trainer.model, trainer.optimizer
    trainer.create_scheduler(num_training_steps=STEPS, optimizer=optimizer)
    compute_loss = trainer.compute_loss

    def forward_then_backward(*args, **kwargs):
        tracker.phase = "forward"
        with (
            torch.autograd.graph.saved_tensors_hooks(
                lambda t: (tracker.mark(t, "saved_activations"), t)[1], lambda t: t
            ),
            tracker.autocast or contextlib.nullcontext(),
        ):
            loss = compute_loss(*args, **kwargs)
        tracker.phase = "backward"
        return loss

    trainer.compute_loss = forward_then_backward
    trainer._prepare_inputs = lambda inputs: {k: _to(v, fake) for k, v in inputs.items()}
    trainer.token_counter.counts.add = lambda inputs: None  # counted from the real batches (tokens_per_step)
    for step, (batch, labels) in enumerate(zip(batches, label_tokens), start=1):
        tracker.step, tracker.label_tokens = step, labels
        tracker.phase = "batch"
        inputs = {k: v for k, v in batch.items() if k != "qllava_real_tokens"}
        inputs = trainer._prepare_inputs(inputs)
        for v in inputs.values():
            tracker.register(v, "batch")
        trainer.training_step(model, inputs, torch.tensor(labels))
        del inputs
        for p in model.parameters():
            if p.grad is not None:
                tracker.mark(p.grad, "gradients")
        tracker.phase = "optimizer"
        if trainer.args.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(
                [p for p in model.parameters() if p.requires_grad], trainer.args.max_grad_norm
            )
        optimizer.step()
        for state in optimizer.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor):
                    tracker.mark(v, "optimizer_states")
        trainer.lr_scheduler.step()
        model.zero_grad(set_to_none=True)
        tracker.phase = "between steps"


def _to(value, fake):
    """The batch as the card holds it: a copy (the host batch is not counted)."""
    if not isinstance(value, torch.Tensor) or _is_fake(value):  # training_step prepares the inputs a second time
        return value
    if fake is None:
        return value.clone()
    return torch.empty(value.shape, dtype=value.dtype)  # under the fake mode


_FLASH_OPS = []


def _flash_ops():
    """Two operators standing in for flash-attn's kernels in the trace (defined once): the forward returns what
    FlashAttention-2 returns, the output and a float32 logsumexp per head and token, and keeps q, k, v, output and
    logsumexp for its backward, which returns dq, dk, dv: no n x n scores anywhere. They run on fake tensors only."""
    if _FLASH_OPS:
        return _FLASH_OPS

    @torch.library.custom_op("qllava_trace::flash_attn", mutates_args=())
    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise TraceError("qllava_trace::flash_attn stands in for flash-attn in a trace only")

    @forward.register_fake
    def _(q, k, v):
        rows, heads, tokens, dim = q.shape
        return q.new_empty((rows, tokens, heads, dim)), q.new_empty((heads, rows * tokens), dtype=torch.float32)

    @torch.library.custom_op("qllava_trace::flash_attn_backward", mutates_args=())
    def backward_op(
        dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise TraceError("qllava_trace::flash_attn_backward stands in for flash-attn in a trace only")

    @backward_op.register_fake
    def _(dout, q, k, v, out, lse):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs, *output)

    def backward(ctx, dout, dlse):
        return backward_op(dout, *ctx.saved_tensors)

    torch.library.register_autograd("qllava_trace::flash_attn", backward, setup_context=setup_context)
    _FLASH_OPS.extend([forward, backward_op])
    return _FLASH_OPS


def flash_attention_stand_in(module, query, key, value, attention_mask, **kwargs):
    """transformers' flash_attention_2 function in a trace: FlashAttention-2's memory (output, logsumexp), and its
    FLOPs counted as SDPA's formula counts them."""
    out, _ = torch.ops.qllava_trace.flash_attn(query, key, value)
    return out, None


def _flash_flops(q, k, v, *args, out_val=None, **kwargs) -> int:
    """Attention FLOPs as torch's SDPA formula counts them (every query with every key; grouped heads as full)."""
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(q.shape, q.shape, q.shape)


def _flash_backward_flops(dout, q, k, v, *args, out_val=None, **kwargs) -> int:
    """The backward's, likewise."""
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(q.shape, q.shape, q.shape, q.shape)


@contextlib.contextmanager
def flash_attention(tracker):
    """transformers' flash_attention_2 served by the stand-in for the trace, its operators counted."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    _flash_ops()
    tracker.flop_registry[torch.ops.qllava_trace.flash_attn] = _flash_flops
    tracker.flop_registry[torch.ops.qllava_trace.flash_attn_backward] = _flash_backward_flops
    tracker.forward_only.add(torch.ops.qllava_trace.flash_attn)
    ALL_ATTENTION_FUNCTIONS["flash_attention_2"] = flash_attention_stand_in
    try:
        yield
    finally:
        del ALL_ATTENTION_FUNCTIONS["flash_attention_2"]


@contextlib.contextmanager
def card_paths(card: bool, tracker: LiveBytes, dtype: str):
    """On a card, the training step takes other paths than on this CPU; the trace takes the card's.

    Fake tensors live on the CPU device: on a CPU-only torch, autograd aborts the process when it makes a view of a
    fake "cuda" tensor that requires grad (its device guard needs CUDA), so a card's memory is traced on fake CPU
    tensors with the three paths that depend on the device switched to the card's:
    - bf16 autocast around the forward and loss, as accelerate wraps the model when training in bf16 on a card;
    - TRL's fused LM head scores only the labelled positions (its Triton path: `hidden_states[mask]`, whose size is
      the micro-batch's label count) and its Triton kernels fold each logit tile in place (no float32 copy of a tile;
      the fp32 gradient accumulation is torch.addmm with out_dtype, no float32 copies of its operands);
    - the optimizer is built as on a card (fused AdamW).
    """
    if not card:
        yield
        return
    from trl.kernels import chunked_logprob
    from trl.trainer import utils as trl_utils

    saved = (
        trl_utils._use_triton,
        chunked_logprob._forward_tile,
        chunked_logprob._backward_tile,
        chunked_logprob._addmm_fp32,
    )

    def addmm_fp32(acc, a, b):  # in place into acc: no memory; its FLOPs counted
        tracker.add_flops(2 * a.shape[0] * a.shape[1] * b.shape[1])

    trl_utils._use_triton = lambda device: True
    chunked_logprob._forward_tile = chunked_logprob._backward_tile = lambda *args, **kwargs: None
    chunked_logprob._addmm_fp32 = addmm_fp32
    tracker.bool_index_sites = {"_fused_forward"}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    try:
        tracker.autocast = autocast
        yield
    finally:
        (
            trl_utils._use_triton,
            chunked_logprob._forward_tile,
            chunked_logprob._backward_tile,
            chunked_logprob._addmm_fp32,
        ) = saved
        tracker.bool_index_sites, tracker.autocast = set(), None


@contextlib.contextmanager
def _trace_patches(real: bool):
    """transformers reads whether image tokens and features match (an .item()) in get_placeholder_mask; the
    collator builds both from the same counts, so the trace skips that check (TRANSFORMERS_DISABLE_TORCH_CHECK)."""
    old = os.environ.get("TRANSFORMERS_DISABLE_TORCH_CHECK")
    if not real:
        os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRANSFORMERS_DISABLE_TORCH_CHECK", None)
        else:
            os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"] = old


@contextlib.contextmanager
def _quiet():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        yield


def trace(recipe: Recipe, stages, device: str = "cuda", gpu_memory_gib: float = 24.0) -> dict:
    """trace_stage of each stage, by name, with the room it leaves on a card of `gpu_memory_gib`."""
    result = {}
    for stage in stages:
        traced = trace_stage(recipe, stage, device)
        traced["free_bytes"] = int(gpu_memory_gib * GIB) - traced["peak_with_allowances_bytes"]
        result[stage] = traced
    return result
