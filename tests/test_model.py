"""Model assembly: 4-bit decoder with exact gradients on CPU, LoRA only on decoder linears, projector files."""

import gc

import pytest
import torch

from qllava import model as modeling


@pytest.fixture
def recipe(tiny_recipe):
    return tiny_recipe()


@pytest.fixture
def processor(recipe):
    return modeling.build_processor(recipe.model)


def batch(model, processor, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_image = modeling.image_geometry(model.config, processor.image_processor).tokens_of()
    text = torch.randint(3, 300, (1, 12), generator=g)
    ids = torch.cat([torch.tensor([[1]]), torch.full((1, n_image), model.config.image_token_id), text], dim=1)
    labels = ids.clone()
    labels[:, : 1 + n_image] = -100
    return {"input_ids": ids, "labels": labels, "pixel_values": torch.randn(1, 3, 64, 64, generator=g)}


def lora_grads(peft_model, inputs) -> dict:
    peft_model.train()
    peft_model.zero_grad()
    peft_model(**inputs, use_cache=False).loss.backward()
    return {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}


def dequantized_twin(quantized, recipe, processor):
    """The same model in float32 with every NF4 weight replaced by its dequantized value."""
    import bitsandbytes as bnb

    twin = modeling.load_base_model(recipe, processor, quantized=False)
    twin_modules = dict(twin.named_modules())
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = module.weight
            twin_modules[name].weight.data = bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    twin.model.multi_modal_projector.load_state_dict(quantized.model.multi_modal_projector.state_dict())
    return twin


def with_same_lora(recipe, base, twin):
    torch.manual_seed(0)
    q, r = modeling.attach_lora(base, recipe.lora), modeling.attach_lora(twin, recipe.lora)
    r_params = dict(r.named_parameters())
    for name, p in q.named_parameters():
        if "lora_" in name:
            p.data.normal_(std=0.1)  # LoRA B starts at zero; give the adapter a real path
            r_params[name].data.copy_(p.data)
    for m in (q, r):
        modeling.projector(m).requires_grad_(True)
    return q, r


def test_4bit_gradients_match_a_dequantized_reference_after_an_eval_forward(recipe, processor):
    base = modeling.load_base_model(recipe, processor)
    q, r = with_same_lora(recipe, base, dequantized_twin(base, recipe, processor))
    inputs = batch(base, processor)
    q.eval()
    with torch.no_grad():  # what evaluation during training does: without the fix it repacks the NF4 weights
        q(**inputs, use_cache=False)
    got, want = lora_grads(q, inputs), lora_grads(r, inputs)
    assert got.keys() == want.keys() and len(got) > 10
    for name in got:
        err = (got[name] - want[name]).norm() / want[name].norm().clamp(min=1e-12)
        assert err < 1e-4, f"{name}: relative gradient error {err:.2e}"


def test_without_the_fix_the_cpu_repack_breaks_gradients(recipe, processor):
    """Documents the pitfall the fix guards against (only CPUs with AVX512-BF16 have it)."""
    import bitsandbytes as bnb
    from bitsandbytes.nn.modules import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: the repacking kernel never runs")
    base = modeling.load_base_model(recipe, processor)
    q, r = with_same_lora(recipe, base, dequantized_twin(base, recipe, processor))
    for m in base.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = True
    inputs = batch(base, processor)
    q.eval()
    with torch.no_grad():
        q(**inputs, use_cache=False)
    got, want = lora_grads(q, inputs), lora_grads(r, inputs)
    worst = max(((got[n] - want[n]).norm() / want[n].norm()).item() for n in got if "lora_A" in n)
    assert worst > 1e-2


def test_decoder_is_4bit_and_the_rest_is_not(recipe, processor):
    import bitsandbytes as bnb

    model = modeling.load_base_model(recipe, processor)
    quantized = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert quantized and all(n.startswith("model.language_model.layers.") for n in quantized)
    assert len(quantized) == 2 * 7  # 2 layers x q,k,v,o,gate,up,down
    assert not any(p.requires_grad for p in model.parameters())


def test_lora_targets_only_decoder_linear_layers(recipe, processor):
    peft_model = modeling.attach_lora(modeling.load_base_model(recipe, processor), recipe.lora)
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in peft_model.named_parameters() if ".lora_A." in n}
    assert len(adapted) == 14
    assert all(".language_model.layers." in n and n.split(".")[-1] in recipe.lora.target_modules for n in adapted)
    trainable = {
        n.split(".modules_to_save")[0].split(".")[-1] if "modules_to_save" in n else "lora"
        for n, p in peft_model.named_parameters()
        if p.requires_grad
    }
    assert trainable == {"lora", "embed_tokens", "lm_head"}  # the tiny recipe also trains these in full


def test_added_tokens_grow_the_vocabulary_deterministically(recipe, processor):
    a = modeling.load_base_model(recipe, processor)
    b = modeling.load_base_model(recipe, processor)
    vocab = a.get_input_embeddings().weight.shape[0]
    assert vocab % 64 == 0 and vocab > a.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>")
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)
    assert torch.equal(a.get_input_embeddings().weight, b.get_input_embeddings().weight)


def test_projector_file_round_trip_and_mismatch(recipe, processor, tmp_path):
    model = modeling.load_base_model(recipe, processor)
    with torch.no_grad():
        modeling.projector(model).linear_2.weight.add_(1.0)
    path = modeling.save_projector(model, tmp_path)
    other = modeling.load_base_model(recipe, processor)
    modeling.load_projector(other, path)
    assert torch.equal(modeling.projector(other).linear_2.weight, modeling.projector(model).linear_2.weight)
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    state["linear_1.weight"] = state["linear_1.weight"][:, :5].contiguous()
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(
        ValueError, match=r"linear_1.weight has shape \(64, 5\), this model's projector needs \(64, 128\)"
    ):
        modeling.load_projector(other, tmp_path / "bad.safetensors")


def test_checkpoints_are_read_not_memory_mapped(tiny_inputs):
    """transformers maps checkpoint files and leaves unquantized tensors as views into them (resident memory then
    grows to the checkpoint's size); qllava's loader reads them (benchmarks/load_7b.py measures the 7B case)."""
    import psutil
    from transformers import AutoModelForCausalLM

    def mapped_files() -> set:
        return {m.path for m in psutil.Process().memory_maps() if m.path.endswith(".safetensors")}

    decoder = str(tiny_inputs / "mistral")
    mapped = AutoModelForCausalLM.from_pretrained(decoder, dtype=torch.float32)
    assert any(path.startswith(decoder) for path in mapped_files())  # the default: views into the mapped file
    del mapped
    gc.collect()
    assert not mapped_files()
    read = modeling.load_decoder(decoder, torch.float32, None, "sdpa")
    assert not mapped_files()
    reference = AutoModelForCausalLM.from_pretrained(decoder, dtype=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(read.state_dict().values(), reference.state_dict().values()))
