"""Decoding settings reach transformers as pocl means them: "no top-k" is no top-k, "no n-gram
blocking" is none, and a checkpoint's own generation_config (top-k, temperature, top-p, penalties ...)
changes nothing. Measured on the tokens generated, not on config objects."""

from __future__ import annotations

import pytest
import torch

from pocl.generation import DecodingConfig, effective_settings, generate

VOCAB = 100
EOS, PAD = 99, 98


class ToyTokenizer:
    """Just what pocl.generation.generate uses."""

    eos_token_id = EOS
    pad_token_id = PAD

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def toy_llama(*, flat: bool = False, seed: int = 0):
    """A 1-layer Llama over 100 ids whose next-token distribution is (nearly) uniform.

    ``flat=False``: the output layer is scaled down to logits of about 1e-4, so every id has a
    probability of 0.01 within 0.1 %, but the logits are distinct and a top-k or top-p keeps a
    strict subset (with exactly equal logits transformers' top-k keeps all ties, and the test could
    not see it). ``flat=True``: the final norm weight is zero, so every logit is exactly 0 and
    greedy decoding picks id 0 at every step (argmax takes the first of equal values).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=EOS, pad_token_id=PAD)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        if flat:
            model.model.norm.weight.zero_()
        else:
            model.lm_head.weight.mul_(1e-3)
    return model


def first_tokens(model, decoding: DecodingConfig, n: int = 300, seed: int = 0) -> list[int]:
    """The first generated token of ``n`` samples from one prompt (EOS counted as a token)."""
    gens = generate(model, ToyTokenizer(), [[5, 6, 7]] * n, decoding, batch_size=n, seed=seed)
    return [g.token_ids[0] if g.token_ids else EOS for g in gens]


ONE_TOKEN = DecodingConfig(max_new_tokens=1, no_repeat_ngram_size=0)  # T = 1, top-p 1, top-k 0


def test_logits_are_near_uniform():
    with torch.no_grad():
        logits = toy_llama()(torch.tensor([[5, 6, 7]])).logits[0, -1]  # [V]
        flat = toy_llama(flat=True)(torch.tensor([[5, 6, 7]])).logits[0, -1]
    probs = logits.softmax(-1)
    assert (probs - 1 / VOCAB).abs().max() < 1e-5 and logits.unique().numel() == VOCAB
    assert torch.equal(flat, torch.zeros(VOCAB))


def test_no_top_k_samples_the_whole_vocabulary():
    model = toy_llama()
    # 300 uniform draws over 100 ids hit about 95 distinct ids; any top-k 50 would allow at most 50
    assert len(set(first_tokens(model, ONE_TOKEN))) > 80
    # the same measurement does see a top-k when one is asked for
    assert len(set(first_tokens(model, DecodingConfig(max_new_tokens=1, no_repeat_ngram_size=0, top_k=50)))) <= 50
    assert len(set(first_tokens(model, DecodingConfig(max_new_tokens=1, no_repeat_ngram_size=0, top_k=3)))) <= 3


def test_the_models_generation_config_does_not_change_the_protocol():
    model = toy_llama()
    gc = model.generation_config
    # what a chat checkpoint may ship (SmolLM2: temperature 0.2, top-p 0.9), and worse
    gc.top_k, gc.temperature, gc.top_p, gc.repetition_penalty = 5, 0.2, 0.9, 1.3
    gc.min_p, gc.typical_p, gc.no_repeat_ngram_size, gc.do_sample = 0.5, 0.5, 1, True
    gc.top_h, gc.epsilon_cutoff, gc.max_new_tokens, gc.num_return_sequences = 0.2, 0.2, 3, 2
    gc.suppress_tokens = list(range(10, 60))
    tokens = first_tokens(model, ONE_TOKEN)
    assert len(set(tokens)) > 80  # the model's top-k 5 (or top-h, typical-p, suppression) would give far fewer
    assert any(10 <= t < 60 for t in tokens)  # suppress_tokens was not applied
    # restored afterwards: pocl hides the model's settings only while it generates
    assert model.generation_config is gc and gc.top_k == 5 and gc.suppress_tokens == list(range(10, 60))
    # and plain transformers generate with the same model does apply them (the test can see the difference)
    out = model.generate(input_ids=torch.tensor([[5, 6, 7]] * 50), do_sample=True, num_return_sequences=1,
                         max_new_tokens=1)
    assert len(set(out[:, -1].tolist())) <= 5


def test_a_wrapped_model_is_protected_too():
    """Wrappers (here a PEFT LoRA model, as a LoRA student) generate through the inner model."""
    peft = pytest.importorskip("peft")
    model = toy_llama()
    model.generation_config.top_k = 5
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    assert len(set(first_tokens(wrapped, ONE_TOKEN))) > 80
    assert model.generation_config.top_k == 5


def test_no_repeat_ngram_size_zero_allows_repeats():
    model = toy_llama(flat=True)
    model.generation_config.no_repeat_ngram_size = 1  # the checkpoint would forbid any repeated token
    model.generation_config.do_sample = True  # and sample: pocl's greedy must stay greedy
    greedy = generate(model, ToyTokenizer(), [[5, 6, 7]], DecodingConfig.greedy(max_new_tokens=5,
                                                                                 no_repeat_ngram_size=0))
    assert greedy[0].token_ids == [0, 0, 0, 0, 0]  # uniform logits: greedy repeats id 0
    sampled = generate(model, ToyTokenizer(), [[5, 6, 7]] * 20, DecodingConfig(max_new_tokens=40,
                                                                                no_repeat_ngram_size=0), batch_size=20)
    # 40 uniform draws from 100 ids repeat an id with probability ~0.9995 per sample
    assert sum(len(set(g.token_ids)) < len(g.token_ids) for g in sampled) >= 15
    # a size pocl does ask for is applied: no unigram repeats, and the prompt counts
    blocked = generate(model, ToyTokenizer(), [[5, 6, 7]], DecodingConfig.greedy(max_new_tokens=5,
                                                                                  no_repeat_ngram_size=1))
    assert blocked[0].token_ids == [0, 1, 2, 3, 4]
    model.generation_config.no_repeat_ngram_size = 0
    bigram = generate(model, ToyTokenizer(), [[0, 0]], DecodingConfig.greedy(max_new_tokens=3, no_repeat_ngram_size=2))
    assert bigram[0].token_ids == [1, 0, 2]  # (0, 0) is in the prompt, so 0 cannot follow 0


def test_effective_settings_are_explicit():
    sampled = effective_settings(DecodingConfig(), eos_token_id=EOS, pad_token_id=PAD)
    assert sampled["top_k"] == 0 and sampled["no_repeat_ngram_size"] == 6 and sampled["top_p"] == 1.0
    assert sampled["temperature"] == 1.0 and sampled["typical_p"] == 1.0 and sampled["min_p"] is None
    assert sampled["epsilon_cutoff"] == 0.0 and sampled["eta_cutoff"] == 0.0 and sampled["num_beams"] == 1
    assert sampled["repetition_penalty"] == 1.0 and sampled["eos_token_id"] == EOS
    greedy = effective_settings(DecodingConfig.greedy(no_repeat_ngram_size=0), eos_token_id=EOS, pad_token_id=PAD)
    assert greedy["do_sample"] is False and greedy["no_repeat_ngram_size"] == 0 and "top_k" not in greedy
