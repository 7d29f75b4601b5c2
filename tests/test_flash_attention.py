"""FlashAttention-2 without a GPU: tests/flash_attn_reference.py, a plain-torch reference of flash-attn's API, is
installed as the `flash_attn` package, and transformers runs qllava's FlashAttention path through it on CPU:
the model from qllava's builder with attn_implementation="flash_attention_2", micro-batches of packed rows
concatenated into one row by qllava's collator (flatten), varlen attention per sample. Its packed loss and gradients
equal the SDPA runs, packed and unpacked, to test_packing_exact's tolerance."""

import sys

import flash_attn_reference as reference
import pytest
import torch
from conftest import TINY_RECIPE, tiny_overrides
from test_packing_exact import alone_logits, collator_for, fp32_model, samples, stage2_model

from qllava import model as modeling
from qllava.packing import packed_step, unpacked_step

FLOAT32 = reference.ACCEPTED_DTYPES | {torch.float32}


@pytest.fixture(scope="module")
def flash_attn(tmp_path_factory):
    """The reference installed as flash-attn for this module's tests, and everything undone afterwards.

    transformers' own checks decide that it may use it: the package is found, its distribution is named flash-attn,
    its version is >= 2.3.3, the model class supports FlashAttention, the five names import, the varlen function's
    signature says which keywords it takes. Only the check's one question about the hardware (is CUDA available?)
    is answered yes, and only inside that check.
    """
    from transformers import modeling_flash_attention_utils as fa_utils
    from transformers.utils import import_utils

    folder = reference.write_package(tmp_path_factory.mktemp("site-packages"))
    available = fa2_check_with_a_cuda_device(import_utils)
    with pytest.MonkeyPatch.context() as patch:
        for name in flash_attn_modules():
            patch.delitem(sys.modules, name)  # a real flash-attn already imported comes back afterwards
        patch.syspath_prepend(str(folder))
        patch.setattr(fa_utils, "is_flash_attn_2_available", available)
        patch.setitem(fa_utils.FLASH_ATTENTION_COMPATIBILITY_MATRIX[2], "general_availability_check", available)
        for name in (
            "_loaded_implementation",
            "_flash_fn",
            "_flash_varlen_fn",
            "_flash_with_kvcache_fn",
            "_pad_fn",
            "_unpad_fn",
            "_process_flash_kwargs_fn",
            "_process_with_kvcache_kwargs_fn",
        ):
            patch.setattr(fa_utils, name, getattr(fa_utils, name))  # what lazy_import_flash_attention caches
        clear_install_caches(import_utils)
        yield reference
        for name in flash_attn_modules():
            del sys.modules[name]
    clear_install_caches(import_utils)


def flash_attn_modules() -> list[str]:
    return [name for name in sys.modules if name == "flash_attn" or name.startswith("flash_attn.")]


def fa2_check_with_a_cuda_device(import_utils):
    """transformers' is_flash_attn_2_available, unchanged, but for its CUDA question, answered yes."""
    check = import_utils.is_flash_attn_2_available.__wrapped__

    def available(kernels_fallback_ok: bool = False) -> bool:
        original = import_utils.is_torch_cuda_available
        import_utils.is_torch_cuda_available = lambda: True
        try:
            return check(kernels_fallback_ok)
        finally:
            import_utils.is_torch_cuda_available = original

    return available


def clear_install_caches(import_utils) -> None:
    """What transformers remembers about installed packages, forgotten (the package appears and goes)."""
    for name in (
        "_package_distribution_mapping",
        "is_flash_attn_2_available",
        "is_flash_attn_3_available",
        "is_flash_attn_4_available",
        "is_flash_attn_greater_or_equal",
    ):
        getattr(import_utils, name).cache_clear()


@pytest.fixture(scope="module")
def setup(tiny_inputs, tmp_path_factory):
    """The tiny recipe, its processor and six samples: five image conversations and a text-only one."""
    from qllava.recipe import load_recipe

    recipe = load_recipe(TINY_RECIPE, tiny_overrides(tiny_inputs, tmp_path_factory.mktemp("fa2")))
    processor = modeling.build_processor(recipe.model)
    return recipe, processor, samples(recipe, processor, images=5)


@pytest.fixture
def exact(monkeypatch):
    """float32 let through (see flash_attn_reference's docstring) and the call log emptied."""
    monkeypatch.setattr(reference, "ACCEPTED_DTYPES", FLOAT32)
    reference.calls.clear()


# The reference itself: exact attention, checked against torch's scaled_dot_product_attention.


def _random(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, requires_grad=True)


def _sdpa_per_sequence(q, k, v, cu_q, cu_k, causal=True, window=(-1, -1), softcap=0.0):
    """Each sequence through SDPA (or, with a softcap, softmax written out), bottom-right-aligned masks."""
    outs = []
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    for i in range(len(bounds_q) - 1):
        qs, ks, vs = (
            x[a:b].transpose(0, 1)
            for x, a, b in (
                (q, bounds_q[i], bounds_q[i + 1]),
                (k, bounds_k[i], bounds_k[i + 1]),
                (v, bounds_k[i], bounds_k[i + 1]),
            )
        )
        lq, lk = qs.shape[1], ks.shape[1]
        rows, cols = torch.arange(lq)[:, None] + lk - lq, torch.arange(lk)[None, :]
        allowed = torch.ones(lq, lk, dtype=torch.bool)
        if causal:
            allowed &= cols <= rows
        if window[0] >= 0:
            allowed &= (cols >= rows - window[0]) & (cols <= rows + window[1])
        ks, vs = (x.repeat_interleave(qs.shape[0] // x.shape[0], dim=0) for x in (ks, vs))
        if softcap:
            scores = softcap * torch.tanh(qs @ ks.transpose(1, 2) / qs.shape[-1] ** 0.5 / softcap)
            out = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ vs
        else:
            out = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed)
        outs.append(out.transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize(
    "case",
    [
        {},  # causal, grouped-query heads
        {"lengths_k": [7, 3, 9]},  # more keys than queries: the causal mask aligned to the bottom right
        {"window": (2, 2)},
        {"softcap": 1.5},
    ],
)
def test_the_reference_is_exact_attention_forward_and_backward(exact, case):
    torch.manual_seed(0)
    lengths_q = [5, 1, 9]
    lengths_k = case.get("lengths_k", lengths_q)
    cu_q = torch.tensor([0, 5, 6, 15], dtype=torch.int32)
    cu_k = torch.cumsum(torch.tensor([0] + lengths_k), 0).to(torch.int32)
    q, k, v = _random(15, 4, 8), _random(sum(lengths_k), 2, 8), _random(sum(lengths_k), 2, 8)
    options = {"window_size": case.get("window", (-1, -1)), "softcap": case.get("softcap", 0.0)}
    out, lse, probs = reference.flash_attn_varlen_func(
        q,
        k,
        v,
        cu_q,
        cu_k,
        torch.tensor(9, dtype=torch.int32),
        max(lengths_k),
        causal=True,
        return_attn_probs=True,
        **options,
    )
    expected = _sdpa_per_sequence(q, k, v, cu_q, cu_k, True, options["window_size"], options["softcap"])
    assert out.shape == (15, 4, 8) and lse.shape == (4, 15) and lse.dtype == torch.float32 and probs.numel() == 0
    assert (out - expected).abs().max() <= 1e-6
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(expected, (q, k, v), grad)
    for g, w in zip(got, want):
        assert (g - w).abs().max() <= 1e-5
    if not case:  # the logsumexp of the first query of the second sequence: it sees its own key alone
        assert torch.allclose(lse[:, 5], (q[5] * k[5].repeat_interleave(2, 0)).sum(-1) / 8**0.5)


def test_flash_attn_func_is_the_batched_case(exact):
    """flash_attn_func (the vision tower's call: no mask, not causal) equals SDPA over the batch."""
    torch.manual_seed(0)
    q, k, v = _random(3, 6, 4, 8), _random(3, 6, 4, 8), _random(3, 6, 4, 8)
    out, lse, _ = reference.flash_attn_func(q, k, v, causal=False, return_attn_probs=True)
    expected = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    assert (out - expected).abs().max() <= 1e-6 and lse.shape == (3, 4, 6)
    grad = torch.randn_like(out)
    for g, w in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(expected, (q, k, v), grad)):
        assert (g - w).abs().max() <= 1e-5


def _varlen(**change):
    q = torch.zeros(6, 2, 8, dtype=torch.bfloat16)
    args = {
        "q": q,
        "k": q,
        "v": q,
        "cu_seqlens_q": torch.tensor([0, 2, 6], dtype=torch.int32),
        "cu_seqlens_k": torch.tensor([0, 2, 6], dtype=torch.int32),
        "max_seqlen_q": 4,
        "max_seqlen_k": 4,
    }
    return reference.flash_attn_varlen_func(**{**args, **change})


@pytest.mark.parametrize(
    "change, named",
    [
        ({"q": torch.zeros(6, 2, 8)}, "fp16 and bf16"),
        ({"cu_seqlens_q": torch.tensor([0, 2, 6])}, "cu_seqlens_q must be a torch.int32"),
        ({"cu_seqlens_k": torch.tensor([0, 4, 2, 6], dtype=torch.int32)}, "cu_seqlens_k decreases"),
        ({"cu_seqlens_q": torch.tensor([0, 2, 5], dtype=torch.int32)}, "cu_seqlens_q runs from 0 to 5"),
        ({"max_seqlen_q": 3}, "max_seqlen_q=3 is shorter than the longest sequence (4)"),
        ({"dropout_p": 0.1}, "dropout_p=0.1"),
        (
            {"k": torch.zeros(6, 3, 8, dtype=torch.bfloat16), "v": torch.zeros(6, 3, 8, dtype=torch.bfloat16)},
            "not a multiple of 3",
        ),
    ],
)
def test_the_reference_refuses_what_flash_attn_refuses_or_would_miscompute(change, named):
    assert _varlen().shape == (6, 2, 8)
    with pytest.raises(reference.ContractError) as refused:
        _varlen(**change)
    assert named in str(refused.value)


# transformers' FlashAttention-2 path, run by qllava's model builder and collator on CPU.


def test_transformers_takes_the_reference_for_flash_attn_2(flash_attn, setup):
    """transformers accepts the installed reference, calls its functions, and qllava's builder gives both the
    decoder and the vision tower FlashAttention-2."""
    from transformers import modeling_flash_attention_utils as fa_utils

    assert fa_utils.is_flash_attn_2_available() and not fa_utils.is_flash_attn_4_available()
    (func, varlen, _, pad, unpad), _ = fa_utils.lazy_import_flash_attention("flash_attention_2")
    assert (func, varlen, pad, unpad) == (
        reference.flash_attn_func,
        reference.flash_attn_varlen_func,
        reference.pad_input,
        reference.unpad_input,
    )
    process = fa_utils.lazy_import_flash_attention("flash_attention_2")[1][0]  # read from varlen's signature
    passed = {name for name, taken in process.keywords["supports_mapping"].items() if taken}
    assert passed >= {"dropout_p", "window_size", "softcap", "deterministic", "max_seqlen_q", "max_seqlen_k"}
    recipe, processor, _ = setup
    model = fp32_model(recipe, processor, "flash_attention_2")
    assert {c._attn_implementation for c in (model.config, model.config.text_config, model.config.vision_config)} == {
        "flash_attention_2"
    }


def test_flash_attention_isolates_packed_samples_only_in_one_flattened_row(flash_attn, exact, setup):
    """With the collator's flatten (what train.py sets for FlashAttention-2), a micro-batch of two packed rows is one
    row, the decoder's attention is varlen with one sequence per sample, and each sample's logits equal it run alone.
    Without flatten, FlashAttention sees two rows of several samples each and lets them attend to each other."""
    recipe, processor, items = setup
    model = fp32_model(recipe, processor, "flash_attention_2")
    rows = [items[:3], items[3:]]  # the second row holds the text-only sample
    unpacked = collator_for(processor, recipe, False)
    alone = [alone_logits(model, unpacked, s) for s in items]
    lengths = [s["length"] for s in items]
    cut = torch.tensor([0] + lengths).cumsum(0)

    reference.calls.clear()
    batch = collator_for(processor, recipe, True, flatten=True).batch(rows)
    batch.pop("labels")
    assert batch["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in batch
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits[0]
    worst = max((logits[cut[i] : cut[i + 1]] - alone[i]).abs().max().item() for i in range(len(items)))
    assert worst <= 1e-5, f"flattened packed row vs alone, max abs logit diff {worst:.2e}"
    decoder = [c for c in reference.calls if c["causal"]]
    tower = [c for c in reference.calls if not c["causal"]]
    layers = model.config.text_config.num_hidden_layers
    assert len(decoder) == layers and all(c["function"] == "flash_attn_varlen_func" for c in decoder)
    assert all(c["cu_seqlens_q"] == c["cu_seqlens_k"] == cut.tolist() for c in decoder)
    assert all(c["max_seqlen_q"] == max(lengths) for c in decoder)
    assert len(tower) == model.config.vision_config.num_hidden_layers
    assert all(c["function"] == "flash_attn_func" for c in tower)

    batch = collator_for(processor, recipe, True).batch(rows)  # two padded rows, not flattened
    batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits
    second = items[1]["length"]
    assert (logits[0, lengths[0] : lengths[0] + second] - alone[1]).abs().max() > 1e-3


def test_flash_attention_packed_loss_and_gradients_equal_the_sdpa_runs(flash_attn, exact, setup):
    """One optimizer step of six samples (five with an image) in two micro-batches, the first of two packed rows
    (flattened into one), the second of two single-sample rows: FlashAttention-2 packed, SDPA packed, SDPA unpacked
    and FlashAttention-2 unpacked (padded rows with an attention mask: flash-attn's unpad/pad path) agree in loss
    and in every trainable gradient (LoRA, the projector, embeddings and head) to 1e-5 relative."""
    recipe, processor, items = setup
    sdpa = stage2_model(recipe, processor, "sdpa")
    fa2 = stage2_model(recipe, processor, "flash_attention_2")
    fa2.load_state_dict(sdpa.state_dict())
    micro_batches = [[[items[0], items[5]], [items[1], items[2]]], [[items[3]], [items[4]]]]
    unpacked = collator_for(processor, recipe, False)
    reference_step = unpacked_step(sdpa, unpacked, items)
    runs = {
        "sdpa packed": packed_step(
            sdpa, collator_for(processor, recipe, True), micro_batches, reference_step.label_tokens
        )
    }
    reference.calls.clear()
    runs["fa2 packed"] = packed_step(
        fa2, collator_for(processor, recipe, True, flatten=True), micro_batches, reference_step.label_tokens
    )
    varlen = [c["cu_seqlens_q"] for c in reference.calls if c["function"] == "flash_attn_varlen_func"]
    runs["fa2 unpacked"] = unpacked_step(fa2, unpacked, items)
    errors = {name: step.error(reference_step) for name, step in runs.items()}
    errors["fa2 packed vs sdpa packed"] = runs["fa2 packed"].error(runs["sdpa packed"])
    print(
        f"against sdpa unpacked (loss {reference_step.loss:.6f}):",
        "; ".join(
            f"{name}: loss {step.loss_error(reference_step):.1e}, gradients {step.gradient_error(reference_step):.1e}"
            for name, step in runs.items()
        ),
    )
    print("worst relative errors:", {k: f"{v:.1e}" for k, v in errors.items()})
    assert max(errors.values()) <= 1e-5, errors
    # the first micro-batch is one row of four samples, the second one of two
    assert {len(cu) - 1 for cu in varlen} == {4, 2}


def test_flash_attention_packed_llava_next_rows_equal_the_sdpa_runs(flash_attn, exact, next_inputs, tmp_path):
    """The same for LLaVA-NeXT, loaded whole from its checkpoint: anyres images of three aspect ratios (their tiles go
    through the tower's flash_attn_func), packed and flattened, against SDPA unpacked."""
    import test_llava_next as next_tests
    from conftest import next_recipe

    recipe = next_recipe(next_inputs, tmp_path / "run")
    processor = modeling.build_processor(recipe.model)
    items = next_tests.samples(recipe, processor)
    sdpa = next_tests.stage2_model(recipe, processor)
    recipe.model.attn_implementation = "flash_attention_2"
    fa2 = next_tests.stage2_model(recipe, processor)
    fa2.load_state_dict(sdpa.state_dict())
    micro_batches = [[[items[0], items[3]], [items[1]]], [[items[2]]]]
    expected = unpacked_step(sdpa, next_tests.collator(recipe, processor, False), items)
    reference.calls.clear()
    got = packed_step(
        fa2, next_tests.collator(recipe, processor, True, flatten=True), micro_batches, expected.label_tokens
    )
    error = got.error(expected)
    print(f"llava-next: fa2 packed vs sdpa unpacked, worst relative error {error:.1e}")
    assert error <= 1e-5
    assert [len(c["cu_seqlens_q"]) - 1 for c in reference.calls if c["function"] == "flash_attn_varlen_func"] == [
        3
    ] * fa2.config.text_config.num_hidden_layers  # the second micro-batch, one sample: flash_attn_func


def test_generation_with_flash_attention_equals_sdpa(flash_attn, exact, setup):
    """chat and eval on FlashAttention-2: left-padded prompts with images (the prefill through flash-attn's
    unpad/varlen/pad path), then one query per prompt against the cache (cu_seqlens_q 0, 1, 2): the same greedy
    answers as SDPA."""
    from PIL import Image

    from qllava import inference

    recipe, processor, _ = setup
    sdpa = fp32_model(recipe, processor, "sdpa")
    fa2 = fp32_model(recipe, processor, "flash_attention_2")
    fa2.load_state_dict(sdpa.state_dict())
    images = [Image.new("RGB", (64, 64), "red"), Image.new("RGB", (40, 64), "blue")]
    questions = ["<image>\nWhat colour is the shape?", "<image>\nWhich shape is on the left of the picture, and why?"]
    answers = {}
    for name, model in (("sdpa", sdpa), ("fa2", fa2)):
        loaded = inference.Loaded(model, processor, recipe.stage2.template, "pad", "run")
        prompts = [inference.prompt_ids(loaded, [("user", q)], [image]) for q, image in zip(questions, images)]
        assert len(prompts[0]) != len(prompts[1])
        reference.calls.clear()
        answers[name] = inference.generate(loaded, prompts, images, max_new_tokens=8)
    assert answers["fa2"] == answers["sdpa"] and any(answers["sdpa"])
    decode = [c for c in reference.calls if c["max_seqlen_q"] == 1]
    assert decode and all(c["cu_seqlens_q"] == [0, 1, 2] for c in decode)


def test_training_with_flash_attention_feeds_one_row_per_micro_batch_to_varlen_attention(
    flash_attn, exact, tiny_recipe, monkeypatch
):
    """A real packed training run (stage 1: 4-bit decoder, qllava's trainer and collator, two rows per micro-batch)
    with attn_implementation = "flash_attention_2": every micro-batch reaches the decoder as one row without mask
    or cache, and flash-attn's varlen function gets one sequence per sample, cut where position_ids restart."""
    from qllava import train

    positions = []
    load = modeling.load_base_model

    def load_and_watch(*args, **kwargs):
        model = load(*args, **kwargs)

        def watch(module, args, kwargs):
            assert kwargs.get("attention_mask") is None and kwargs.get("use_cache") is False
            positions.append(kwargs["position_ids"])

        model.model.language_model.register_forward_pre_hook(watch, with_kwargs=True)
        return model

    monkeypatch.setattr(modeling, "load_base_model", load_and_watch)
    result = train.run_stage(
        tiny_recipe(
            'model.attn_implementation="flash_attention_2"',
            "stage1.max_steps=3",
            "stage1.per_device_train_batch_size=2",
        ),
        "stage1",
        say=lambda _: None,
    )
    assert result.metrics["attn_implementation"] == "flash_attention_2" and len(positions) == 3
    starts = []
    for p in positions:
        assert p.shape[0] == 1 and (p == 0).sum() > 2  # two packed rows of captions, concatenated
        starts.append((p[0] == 0).nonzero().flatten().tolist() + [p.shape[1]])
    layers = result.model.config.text_config.num_hidden_layers
    varlen = [c["cu_seqlens_q"] for c in reference.calls if c["function"] == "flash_attn_varlen_func"]
    assert varlen == [cut for cut in starts for _ in range(layers)]


def test_a_half_precision_model_hands_flash_attention_half_precision(flash_attn, setup, tiny_recipe):
    """flash-attn's dtype contract where it matters: the model stage 2 trains in bfloat16 (4-bit decoder computing in
    bf16, LoRA and projector as float32 masters) under the bf16 autocast the trainer uses on a GPU, through the
    reference as it is (fp16/bf16 only). Its loss is SDPA's within bf16 rounding."""
    from qllava import train

    _, _, items = setup
    half = ['model.dtype="bfloat16"', 'quantization.bnb_4bit_compute_dtype="bfloat16"', 'stage2.projector="fresh"']
    losses = {}
    for attn in ("sdpa", "flash_attention_2"):
        recipe = tiny_recipe(*half, f'model.attn_implementation="{attn}"')
        model, processor = train.build_stage_model(recipe, "stage2")  # seeded: both get the same projector and LoRA
        batch = collator_for(processor, recipe, True, flatten=attn != "sdpa").batch([items[:3], items[3:]])
        reference.calls.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**batch, use_cache=False)
        out.loss.backward()
        losses[attn] = out.loss.item()
    print("bf16 losses:", losses)
    assert {c["dtype"] for c in reference.calls} == {torch.bfloat16}
    assert abs(losses["flash_attention_2"] - losses["sdpa"]) <= 1e-3 * losses["sdpa"], losses


def test_auto_chooses_flash_attention_only_for_a_half_precision_model(flash_attn, monkeypatch):
    """flash-attn installed and CUDA present: "auto" is flash_attention_2 for bf16/fp16 models; a float32 model (the
    tiny recipes) gets sdpa, since flash-attn would refuse its float32 activations at the first step."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert modeling.attention_implementation("auto", torch.bfloat16) == "flash_attention_2"
    assert modeling.attention_implementation("auto", torch.float16) == "flash_attention_2"
    assert modeling.attention_implementation("auto", torch.float32) == "sdpa"
    assert modeling.attention_implementation("eager", torch.bfloat16) == "eager"
