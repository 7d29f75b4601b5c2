"""A plain-torch reference of flash-attn 2's Python API, as transformers 5.x calls it: the contract, not a kernel.

FlashAttention-2 needs a CUDA card, so no test could run qllava's FlashAttention path. This module stands in for
the `flash_attn` package: the same names, signatures, argument checks and return values, computed exactly in
plain torch on any device. `write_package` lays it out as an installed distribution (a `flash_attn` package and
its `flash_attn-<version>.dist-info`), so that transformers' own availability checks accept it.

What transformers 5.x takes from flash-attn (modeling_flash_attention_utils.py, `_lazy_imports`):
  - `from flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache`
  - `from flash_attn.bert_padding import pad_input, unpad_input`
and how it decides that it may (utils/import_utils.py `is_flash_attn_2_available`; modeling_utils.py
`_check_and_adjust_attn_implementation`, `_flash_attn_can_dispatch`): `importlib.util.find_spec("flash_attn")`;
`importlib.metadata.version("flash_attn")` >= 2.3.3; `packages_distributions()["flash_attn"]` holding the
distribution "flash-attn" (or "flash_attn"; "flash-attn-4" is FlashAttention-4); a CUDA device
(`torch.cuda.is_available()`); the model class's `_supports_flash_attn`. A model dtype other than fp16/bf16 only
warns. `inspect.signature(flash_attn_varlen_func)` decides which keywords it is passed (dropout_p, window_size,
deterministic, softcap, block_table, max_seqlen_q/k; see `_lazy_define_process_function`).

How transformers calls them (`_flash_attention_forward`; q, k, v as (batch, seqlen, heads, head_dim)):
  - position_ids of one row (batch 1) that restart: `flash_attn_varlen_func(q, k, v, cu_seqlens_q=, cu_seqlens_k=,
    causal=, softmax_scale=, dropout_p=, deterministic=, max_seqlen_q=, max_seqlen_k=[, window_size=][, softcap=])`
    on the flattened (total, heads, head_dim) tensors, cu_seqlens from where position_ids restart (int32), and
    max_seqlen a 0-dim int32 tensor (`cu_seqlens.diff().max()`, which flash-attn's int argument accepts);
  - an attention mask: `unpad_input`/`_upad_input`, the same varlen call, then `pad_input`;
  - otherwise (no mask, position_ids absent or one increasing run, e.g. the vision tower): `flash_attn_func(q, k, v,
    causal=, softmax_scale=, dropout_p=, deterministic=[, window_size=][, softcap=])`;
  - `flash_attn_with_kvcache` only for paged continuous batching (not used by qllava): present, not implemented.
window_size is passed only when a sliding window is shorter than the keys (Mistral v0.1's 4096 against a
flattened micro-batch), as (window - 1, window - 1) around each query of its own sequence.

The contract checked here, as flash-attn checks it or as a wrong value would silently corrupt its result:
q (total_q, heads, d), k and v (total_k, heads_k, d) with heads a multiple of heads_k (grouped-query attention),
d <= 256, one dtype, fp16/bf16; cu_seqlens int32, 1-D, contiguous, one more entry than sequences, starting at 0,
never decreasing, ending at the total (the kernel trusts these: a wrong boundary lets samples see each other);
max_seqlen at least the longest sequence (the kernel launches that many rows per sequence and never computes the
rest); dropout_p 0 (the reference is exact; attention dropout is random), no alibi_slopes, no block_table.
q, k and v need no particular layout (transformers hands over transposed views; flash-attn's wrapper copies a
tensor whose last dimension is not contiguous). The device is the one thing deliberately not checked: that is
what the reference is for.

Float32: flash-attn refuses it ("FlashAttention only support fp16 and bf16 data type"), and so does this reference
by default (ACCEPTED_DTYPES), which checks that a model built for training hands it half precision. Tests that
compare FlashAttention with SDPA to 1e-5 (test_packing_exact's tolerance) add float32 to ACCEPTED_DTYPES: in
bf16 the two differ by rounding alone (~1e-2), which would hide a wrong sequence boundary of a few tokens.

Results: out in q's dtype, computed from float32 scores; softmax_lse float32, (heads, total_q) for varlen and
(batch, heads, seqlen_q) for flash_attn_func; with return_attn_probs, (out, softmax_lse, S_dmask) where S_dmask
is empty, as flash-attn returns it without dropout. A query with no key to attend (causal with seqlen_q >
seqlen_k) gets out 0 and lse +inf, as the kernel writes them. The backward, like flash-attn's, reads only what the
forward saved (q, k, v, out, softmax_lse) and recomputes each sequence's scores: no seqlen x seqlen matrix lives
from forward to backward.

`calls` records every call (function, causal, cu_seqlens, dtype), for tests to check what reached the kernel.
"""

from __future__ import annotations

from pathlib import Path

import torch

__version__ = "2.8.3"
"""The version the written distribution declares (transformers requires >= 2.3.3)."""

ACCEPTED_DTYPES = {torch.float16, torch.bfloat16}
"""What flash-attn accepts; tests comparing with SDPA exactly add torch.float32 (see the module docstring)."""

calls: list[dict] = []
"""One entry per call of flash_attn_func / flash_attn_varlen_func, in order."""


class ContractError(ValueError):
    """An argument outside flash-attn's contract: the real kernel would refuse it or compute garbage."""


def flash_attn_func(
    q,
    k,
    v,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """Attention over a padded-free batch: q (batch, seqlen_q, heads, d), k and v (batch, seqlen_k, heads_k, d).
    Returns out (batch, seqlen_q, heads, d), or (out, softmax_lse (batch, heads, seqlen_q), S_dmask)."""
    _check_options(dropout_p, window_size, softcap, alibi_slopes, None)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ContractError(
            f"flash_attn_func takes (batch, seqlen, heads, head_dim) tensors, got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape[0] != q.shape[0]:
        raise ContractError(f"q and k have different batch sizes: {q.shape[0]} and {k.shape[0]}")
    batch, seqlen_q, heads, dim = q.shape
    seqlen_k = k.shape[1]
    cu_q = torch.arange(0, (batch + 1) * seqlen_q, seqlen_q, dtype=torch.int32, device=q.device)
    cu_k = torch.arange(0, (batch + 1) * seqlen_k, seqlen_k, dtype=torch.int32, device=q.device)
    flat = [x.reshape(-1, *x.shape[2:]) for x in (q, k, v)]
    _check_tensors(*flat)
    _record("flash_attn_func", q, causal, cu_q, window_size, softcap)
    out, lse = _VarlenAttention.apply(
        *flat, cu_q, cu_k, _scale(softmax_scale, dim), causal, tuple(window_size), float(softcap)
    )
    out = out.view(batch, seqlen_q, heads, dim)
    if not return_attn_probs:
        return out
    return out, lse.view(heads, batch, seqlen_q).transpose(0, 1), _no_probs(q)


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
):
    """Attention over sequences laid end to end: q (total_q, heads, d), k and v (total_k, heads_k, d), sequence i
    being rows cu_seqlens[i]:cu_seqlens[i + 1]. Each sequence attends only to itself (causal: bottom-right aligned).
    Returns out (total_q, heads, d), or (out, softmax_lse (heads, total_q), S_dmask)."""
    _check_options(dropout_p, window_size, softcap, alibi_slopes, block_table)
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ContractError(
            f"flash_attn_varlen_func takes (total, heads, head_dim) tensors, got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    _check_tensors(q, k, v)
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q, max_seqlen_q, "max_seqlen_q")
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k, max_seqlen_k, "max_seqlen_k")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ContractError(
            f"cu_seqlens_q has {cu_seqlens_q.numel()} entries and cu_seqlens_k "
            f"{cu_seqlens_k.numel()}: one more than the number of sequences, for both"
        )
    _record(
        "flash_attn_varlen_func",
        q,
        causal,
        cu_seqlens_q,
        window_size,
        softcap,
        cu_seqlens_k,
        int(max_seqlen_q),
        int(max_seqlen_k),
    )
    out, lse = _VarlenAttention.apply(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        _scale(softmax_scale, q.shape[-1]),
        causal,
        tuple(window_size),
        float(softcap),
    )
    return (out, lse, _no_probs(q)) if return_attn_probs else out


def flash_attn_with_kvcache(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    rotary_cos=None,
    rotary_sin=None,
    cache_seqlens=None,
    cache_batch_idx=None,
    cache_leftpad=None,
    block_table=None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    rotary_interleaved=True,
    alibi_slopes=None,
    num_splits=0,
    return_softmax_lse=False,
):
    """Present because transformers imports it (and reads its signature); used only for paged continuous batching,
    which qllava does not do."""
    raise NotImplementedError("flash_attn_with_kvcache (paged continuous batching) is not part of this reference")


def pad_input(hidden_states, indices, batch, seqlen):
    """flash_attn.bert_padding.pad_input: rows (total, ...) back to (batch, seqlen, ...), zeros where no row was."""
    out = hidden_states.new_zeros(batch * seqlen, *hidden_states.shape[1:])
    out[indices] = hidden_states
    return out.view(batch, seqlen, *hidden_states.shape[1:])


def unpad_input(hidden_states, attention_mask, unused_mask=None):
    """flash_attn.bert_padding.unpad_input: (rows of the kept positions, their flat indices, cu_seqlens (int32),
    the longest sequence, tokens used per sequence)."""
    kept = attention_mask + unused_mask if unused_mask is not None else attention_mask
    lengths = kept.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(kept.flatten()).flatten()
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(lengths, dim=0, dtype=torch.int32), (1, 0))
    rows = hidden_states.reshape(-1, *hidden_states.shape[2:])[indices]
    return rows, indices, cu_seqlens, int(lengths.max()), attention_mask.sum(dim=-1, dtype=torch.int32)


def write_package(folder: Path) -> Path:
    """`folder` made to hold this reference as an installed flash-attn: the package `flash_attn` (re-exporting
    this module's functions; this module must be importable as `flash_attn_reference`) and the distribution
    metadata transformers reads. Put `folder` on sys.path to install it."""
    package = folder / "flash_attn"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(
        '"""flash-attn\'s API, from the plain-torch reference in tests/flash_attn_reference.py."""\n'
        "from flash_attn_reference import (__version__, flash_attn_func, flash_attn_varlen_func,  # noqa: F401\n"
        "                                  flash_attn_with_kvcache)\n"
    )
    (package / "bert_padding.py").write_text("from flash_attn_reference import pad_input, unpad_input  # noqa: F401\n")
    dist = folder / f"flash_attn-{__version__}.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: flash_attn\nVersion: {__version__}\n")
    (dist / "top_level.txt").write_text("flash_attn\n")
    (dist / "RECORD").write_text("")
    return folder


class _VarlenAttention(torch.autograd.Function):
    """Exact attention per sequence, with flash-attn's memory contract: forward saves q, k, v, out and the
    logsumexp; backward recomputes the scores of one sequence at a time from them."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, scale, causal, window, softcap):
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
        for sq, sk in _sequences(cu_q, cu_k):
            probs, seq_lse = _probabilities(q[sq], k[sk], scale, causal, window, softcap)
            out[sq] = torch.einsum("hqk,khd->qhd", probs, _grouped(v[sk], q.shape[1]).float()).to(q.dtype)
            lse[:, sq] = seq_lse
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.options = scale, causal, window, softcap
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        scale, causal, window, softcap = ctx.options
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        heads, heads_k = q.shape[1], k.shape[1]
        for sq, sk in _sequences(cu_q, cu_k):
            capped = _scores(q[sq], k[sk], scale, softcap)
            probs = torch.exp(_masked(capped, causal, window) - lse[:, sq, None])  # +inf lse: no key, all zero
            do, o = dout[sq].float(), out[sq].float()
            kk, vv = _grouped(k[sk], heads).float(), _grouped(v[sk], heads).float()
            dv_seq = torch.einsum("hqk,qhd->khd", probs, do)
            dprobs = torch.einsum("qhd,khd->hqk", do, vv)
            dscores = probs * (dprobs - (do * o).sum(-1).transpose(0, 1)[..., None])
            if softcap > 0:  # capped = softcap * tanh(raw / softcap)
                dscores = dscores * (1 - (capped / softcap) ** 2)
            dq[sq] = (scale * torch.einsum("hqk,khd->qhd", dscores, kk)).to(q.dtype)
            dk_seq = scale * torch.einsum("hqk,qhd->khd", dscores, q[sq].float())
            dk[sk] = _ungrouped(dk_seq, heads_k).to(k.dtype)
            dv[sk] = _ungrouped(dv_seq, heads_k).to(v.dtype)
        return dq, dk, dv, None, None, None, None, None, None


def _sequences(cu_q, cu_k):
    """(query rows, key rows) of each sequence."""
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    return [
        (slice(bounds_q[i], bounds_q[i + 1]), slice(bounds_k[i], bounds_k[i + 1])) for i in range(len(bounds_q) - 1)
    ]


def _grouped(x, heads):
    """k or v with each of its heads repeated for the query heads that share it (grouped-query attention)."""
    return x.repeat_interleave(heads // x.shape[1], dim=1)


def _ungrouped(grad, heads_k):
    """The gradient of the repeated heads summed back onto the heads they repeat."""
    return grad.view(grad.shape[0], heads_k, -1, grad.shape[-1]).sum(dim=2)


def _scores(q, k, scale, softcap):
    """Scaled (and soft-capped) float32 scores of one sequence, (heads, seqlen_q, seqlen_k)."""
    scores = torch.einsum("qhd,khd->hqk", q.float(), _grouped(k, q.shape[1]).float()) * scale
    return softcap * torch.tanh(scores / softcap) if softcap > 0 else scores


def _masked(scores, causal, window):
    """Scores with -inf where a query may not look: after it (causal, aligned to the bottom right when seqlen_q !=
    seqlen_k) or outside its window [i + shift - left, i + shift + right] (-1: unbounded)."""
    seqlen_q, seqlen_k = scores.shape[-2:]
    shift = seqlen_k - seqlen_q
    query = torch.arange(seqlen_q, device=scores.device)[:, None] + shift
    key = torch.arange(seqlen_k, device=scores.device)[None, :]
    left, right = window
    allowed = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=scores.device)
    if causal:
        allowed &= key <= query
    if left >= 0:
        allowed &= key >= query - left
    if right >= 0:
        allowed &= key <= query + right
    return scores.masked_fill(~allowed, float("-inf"))


def _probabilities(q, k, scale, causal, window, softcap):
    """(softmax probabilities (heads, seqlen_q, seqlen_k), logsumexp (heads, seqlen_q)) of one sequence. A row
    with no key allowed gets probabilities 0 and logsumexp +inf, as flash-attn writes it."""
    scores = _masked(_scores(q, k, scale, softcap), causal, window)
    lse = torch.logsumexp(scores, dim=-1)
    lse = lse.masked_fill(lse == float("-inf"), float("inf"))
    return torch.exp(scores - lse[..., None]), lse


def _scale(softmax_scale, head_dim: int) -> float:
    return head_dim**-0.5 if softmax_scale is None else float(softmax_scale)


def _no_probs(q):
    """S_dmask as flash-attn returns it without dropout: empty."""
    return torch.empty(0, dtype=q.dtype, device=q.device)


def _check_options(dropout_p, window_size, softcap, alibi_slopes, block_table) -> None:
    if dropout_p != 0:
        raise ContractError(
            f"dropout_p={dropout_p}: the reference computes exact attention; attention dropout is "
            "random (qllava's models have none)"
        )
    if alibi_slopes is not None or block_table is not None:
        raise ContractError(
            "alibi_slopes and block_table are not part of this reference (transformers passes neither "
            "to the varlen function for qllava's models)"
        )
    if len(window_size) != 2 or any(int(w) != w or w < -1 for w in window_size):
        raise ContractError(f"window_size={window_size!r}: two ints, each -1 (unbounded) or >= 0")
    if softcap < 0:
        raise ContractError(f"softcap={softcap}: 0 (off) or positive")


def _check_tensors(q, k, v) -> None:
    """Shapes and dtypes of the flattened q (total_q, heads, d), k and v (total_k, heads_k, d)."""
    if q.dtype not in ACCEPTED_DTYPES:
        raise ContractError(f"FlashAttention only supports fp16 and bf16 data types, got q in {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ContractError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape or k.shape[-1] != q.shape[-1]:
        raise ContractError(
            f"k and v must have one shape and q's head_dim: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[1] % k.shape[1]:
        raise ContractError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads")
    if q.shape[-1] > 256:
        raise ContractError(f"head_dim {q.shape[-1]} > 256, the most FlashAttention-2 supports")
    if len({q.device, k.device, v.device}) != 1:
        raise ContractError("q, k and v must be on one device")


def _check_cu_seqlens(name: str, cu, rows, max_seqlen, max_name: str) -> None:
    """cu_seqlens as the kernel trusts it: int32, 1-D, contiguous, from 0 to the row count, never decreasing; and
    max_seqlen (an int or a one-element integer tensor) at least the longest sequence."""
    if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32:
        raise ContractError(
            f"{name} must be a torch.int32 tensor, got "
            f"{cu.dtype if isinstance(cu, torch.Tensor) else type(cu).__name__}"
        )
    if cu.dim() != 1 or cu.numel() < 2 or not cu.is_contiguous() or cu.device != rows.device:
        raise ContractError(
            f"{name} must be a contiguous 1-D tensor of sequences + 1 entries on q's device, got "
            f"shape {tuple(cu.shape)}"
        )
    bounds = cu.tolist()
    if bounds[0] != 0 or bounds[-1] != rows.shape[0]:
        raise ContractError(
            f"{name} runs from {bounds[0]} to {bounds[-1]}; it must run from 0 to the {rows.shape[0]} rows it indexes"
        )
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    if min(lengths) < 0:
        raise ContractError(f"{name} decreases: {bounds}")
    if isinstance(max_seqlen, torch.Tensor):
        if max_seqlen.numel() != 1 or max_seqlen.is_floating_point():
            raise ContractError(f"{max_name} must be an int (or a one-element integer tensor), got {max_seqlen!r}")
    elif not isinstance(max_seqlen, int):
        raise ContractError(f"{max_name} must be an int, got {type(max_seqlen).__name__}")
    if int(max_seqlen) < max(lengths):
        raise ContractError(
            f"{max_name}={int(max_seqlen)} is shorter than the longest sequence ({max(lengths)}): "
            "the kernel would leave its last rows uncomputed"
        )


def _record(function, q, causal, cu_q, window, softcap, cu_k=None, max_q=None, max_k=None) -> None:
    calls.append(
        {
            "function": function,
            "causal": bool(causal),
            "dtype": q.dtype,
            "heads": q.shape[-2],
            "cu_seqlens_q": cu_q.tolist(),
            "cu_seqlens_k": None if cu_k is None else cu_k.tolist(),
            "max_seqlen_q": max_q,
            "max_seqlen_k": max_k,
            "window_size": tuple(window),
            "softcap": softcap,
        }
    )
