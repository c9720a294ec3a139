"""Speculative KD sampling (pocl.training.speculative) against naive one-sequence references.

The references below are written from the spec: a Python loop over one sequence, full forward passes
(no padding, no cache), the same per-row generator protocol (the draft samples of a block, then the
replacement). The models run in float64 so that padding and caching cannot flip a sample.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from pocl.errors import ConfigError
from pocl.generation import DecodingConfig, generate
from pocl.training.speculative import (
    SpeculativeSettings,
    SpeculativeStats,
    inverse_cdf,
    sample_rows,
    speculative_generate,
)
from pocl.training.stages import stream_seed
from tests.conftest import make_llama

SEED = 11


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def pair(suite_tokenizer):
    """(student, teacher) in float64; the student has 7 extra output rows (the shared vocabulary is cut)."""
    teacher = make_llama(suite_tokenizer, hidden=32, layers=2, seed=1).double().eval()
    student = make_llama(suite_tokenizer, hidden=16, layers=1, seed=2, vocab_rows=len(suite_tokenizer) + 7)
    return student.double().eval(), teacher


@pytest.fixture(scope="module")
def prompts(suite_tokenizer):
    gen = torch.Generator().manual_seed(5)
    lengths = [3, 9, 5, 12, 1, 7]
    return [torch.randint(2, len(suite_tokenizer), (n,), generator=gen).tolist() for n in lengths]


@pytest.fixture(scope="module")
def bigram_pair(suite_tokenizer):
    """(student, teacher) whose logits are bigram tables (the output depends on the last token only):
    teacher logits ~ N(0, 9), student = teacher + N(0, 0.25) noise, so that drafted tokens often sit at
    the top-K boundary (rank == K) or are the token that crosses the top-p threshold."""
    vocab = len(suite_tokenizer)
    gen = torch.Generator().manual_seed(0)
    table = 3.0 * torch.randn(vocab, vocab, generator=gen, dtype=torch.float64)
    noisy = table + 0.5 * torch.randn(vocab, vocab, generator=gen, dtype=torch.float64)
    student_table = torch.cat([noisy, torch.zeros(vocab, 7, dtype=torch.float64)], dim=1)
    return _bigram(suite_tokenizer, student_table, seed=2), _bigram(suite_tokenizer, table, seed=1)


def _bigram(tokenizer, table, seed):
    """A tiny llama whose output layer returns ``table[last input token]`` (hooks; test double)."""
    model = make_llama(tokenizer, hidden=8, layers=1, seed=seed, vocab_rows=table.shape[1]).double().eval()
    seen = {}
    model.get_input_embeddings().register_forward_hook(lambda module, args, out: seen.update(ids=args[0]))
    model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: table[seen["ids"]][:, -out.shape[1]:])
    return model


@pytest.fixture(scope="module")
def gpt2_pair(suite_tokenizer):
    """(student, teacher) with absolute position embeddings: wrong position ids change their logits
    (llama's rotary positions are shift-invariant and would not notice)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2(width, layers, seed):
        torch.manual_seed(seed)
        cfg = GPT2Config(vocab_size=len(suite_tokenizer), n_embd=width, n_layer=layers, n_head=2, n_positions=128,
                         bos_token_id=None, eos_token_id=0, pad_token_id=1)
        model = GPT2LMHeadModel(cfg).double().eval()
        with torch.no_grad():  # init (std 0.01 / 0.02) makes positions barely move the samples
            model.transformer.wpe.weight.normal_(0.0, 0.5)
            model.transformer.wte.weight.normal_(0.0, 0.5)
        return model

    return gpt2(16, 1, 3), gpt2(32, 2, 4)


def eos_bias(model, value: float):
    """Add ``value`` to the EOS logit of ``model`` (a forward hook on the output layer); returns the handle."""
    rows = model.get_output_embeddings().weight.shape[0]
    bias = torch.zeros(rows, dtype=torch.float64)
    bias[0] = value  # EOS of the suite tokenizer

    return model.get_output_embeddings().register_forward_hook(lambda module, args, out: out + bias.to(out.dtype))


# ---------------------------------------------------------------------------------------- references
def _last_logits(model, tokens, vocab):
    return model(input_ids=torch.tensor([tokens])).logits[0, -1, :vocab]


def _vocab(student, teacher):
    return min(student.get_output_embeddings().weight.shape[0], teacher.get_output_embeddings().weight.shape[0])


def _k_at(s: SpeculativeSettings, n: int) -> int:
    if s.top_k_end is None:
        return s.top_k
    return max(1, round(s.top_k + (s.top_k_end - s.top_k) * n / max(s.max_new_tokens - 1, 1)))


def _nucleus(logits, top_p: float) -> list[int]:
    """The smallest set of most probable tokens with cumulative probability >= top_p (sorted)."""
    probs, order = torch.sort(torch.softmax(logits, -1), descending=True)
    crossing = (torch.cumsum(probs, -1) >= top_p).nonzero()
    size = int(crossing[0]) + 1 if len(crossing) else len(probs)
    return order[:size].tolist()


def naive_draw(probs, gen) -> int:
    """Inverse transform, written out: one float64 uniform ``u`` of ``gen``; the first token whose
    running sum (float64, left to right) exceeds ``u`` times the total, the threshold kept below the total."""
    u = float(torch.rand(1, generator=gen, dtype=torch.float64))
    running, sums = 0.0, []
    for p in probs.double().tolist():
        running += p
        sums.append(running)
    threshold = min(u * running, math.nextafter(running, 0.0))
    return next(i for i, c in enumerate(sums) if c > threshold)


@torch.no_grad()
def naive_skd(student, teacher, prompt, s: SpeculativeSettings, index: int, eos: int = 0, boundary=None):
    """(tokens, stopped_at_eos, stats) of one prompt, straight from the spec. ``boundary`` (a list)
    collects the judged drafts at the acceptance boundary: rank K, or the top-p crossing token."""
    gen = torch.Generator().manual_seed(stream_seed("skd", SEED, index))
    vocab = _vocab(student, teacher)
    out: list[int] = []
    stats = SpeculativeStats()
    while True:
        draft: list[int] = []
        for _ in range(min(s.gamma, s.max_new_tokens - len(out))):
            probs = torch.softmax(_last_logits(student, prompt + out + draft, vocab) / s.temperature, -1)
            draft.append(naive_draw(probs, gen))
            if draft[-1] == eos:
                break
        stats.blocks += 1
        stats.drafted += len(draft)
        for j, token in enumerate(draft):
            logits = _last_logits(teacher, prompt + out, vocab)
            if s.top_p > 0:
                nucleus = _nucleus(logits, s.top_p)
                ok = token in nucleus
                at_boundary = token == nucleus[-1]  # the crossing token
            else:
                ok = token in torch.topk(logits, _k_at(s, len(out))).indices.tolist()
                at_boundary = torch.topk(logits, _k_at(s, len(out)) + 1).indices[-1] == token
            if boundary is not None and at_boundary:
                boundary.append(token)
            if not ok:
                if s.teacher_temperature == 0:
                    out.append(int(logits.argmax()))
                else:
                    probs = torch.softmax(logits / s.teacher_temperature, -1)
                    out.append(naive_draw(probs, gen))
                stats.replaced += 1
                break
            out.append(token)
            stats.accepted += 1
        if eos in out:
            return out[:out.index(eos)], True, stats
        if len(out) >= s.max_new_tokens:
            return out, False, stats


@torch.no_grad()
def naive_student_sampling(student, teacher, prompt, s: SpeculativeSettings, index: int, eos: int = 0):
    gen = torch.Generator().manual_seed(stream_seed("skd", SEED, index))
    vocab, out = _vocab(student, teacher), []
    while len(out) < s.max_new_tokens:
        probs = torch.softmax(_last_logits(student, prompt + out, vocab) / s.temperature, -1)
        out.append(naive_draw(probs, gen))
        if out[-1] == eos:
            return out[:-1], True
    return out, False


@torch.no_grad()
def naive_greedy(model, prompt, max_new_tokens: int, vocab: int, eos: int = 0):
    out: list[int] = []
    while len(out) < max_new_tokens:
        out.append(int(_last_logits(model, prompt + out, vocab).argmax()))
        if out[-1] == eos:
            return out[:-1], True
    return out, False


def _as_tuples(generations):
    return [(g.token_ids, g.stopped_at_eos) for g in generations]


# ------------------------------------------------------------------------------------------- tests
SETTINGS = {
    "top_k": SpeculativeSettings(gamma=4, top_k=150, temperature=0.7, teacher_temperature=0.8, max_new_tokens=14),
    "top_p": SpeculativeSettings(gamma=3, top_p=0.6, temperature=1.0, teacher_temperature=1.3, max_new_tokens=13),
    "k_decay": SpeculativeSettings(gamma=5, top_k=400, top_k_end=20, temperature=0.5, teacher_temperature=1.0,
                                   max_new_tokens=15),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_matches_naive_reference_for_every_batch_size(pair, prompts, suite_tokenizer, name):
    student, teacher = pair
    s = SETTINGS[name]
    expected, total = [], SpeculativeStats()
    for i, p in enumerate(prompts):
        tokens, stopped, stats = naive_skd(student, teacher, p, s, i)
        expected.append((tokens, stopped))
        total.add(stats)
    assert 0 < total.accepted < total.drafted and total.replaced > 0  # both branches are exercised
    for batch_size in (1, 2, 6):
        out, stats = speculative_generate(student, teacher, suite_tokenizer, prompts, s, seed=SEED,
                                          batch_size=batch_size)
        assert _as_tuples(out) == expected, batch_size
        assert stats == total
        assert [g.text for g in out] == [suite_tokenizer.decode(t, skip_special_tokens=True) for t, _ in expected]


@pytest.mark.parametrize("settings", [
    SpeculativeSettings(gamma=4, top_k=8, top_k_end=2, max_new_tokens=15),
    SpeculativeSettings(gamma=3, top_p=0.5, teacher_temperature=0.7, max_new_tokens=15),
], ids=["k_decay", "top_p"])
def test_acceptance_boundaries_match_reference(bigram_pair, prompts, suite_tokenizer, settings):
    """The K-th token is accepted and the (K+1)-th is not; the top-p crossing token is accepted."""
    student, teacher = bigram_pair
    prompts = prompts * 2  # the same prompts at other indices draw other samples
    expected, boundary = [], []
    for i, p in enumerate(prompts):
        expected.append(naive_skd(student, teacher, p, settings, i, boundary=boundary)[:2])
    assert len(boundary) >= 5
    for batch_size in (1, 6):
        out, _ = speculative_generate(student, teacher, suite_tokenizer, prompts, settings, seed=SEED,
                                      batch_size=batch_size)
        assert _as_tuples(out) == expected


def test_position_ids_follow_left_padding(gpt2_pair, prompts, suite_tokenizer):
    student, teacher = gpt2_pair
    s = SpeculativeSettings(gamma=4, top_k=200, temperature=0.8, max_new_tokens=12)
    expected, total = [], SpeculativeStats()
    for i, p in enumerate(prompts):
        tokens, stopped, stats = naive_skd(student, teacher, p, s, i)
        expected.append((tokens, stopped))
        total.add(stats)
    assert 0 < total.accepted < total.drafted
    for batch_size in (1, 6):
        out, stats = speculative_generate(student, teacher, suite_tokenizer, prompts, s, seed=SEED,
                                          batch_size=batch_size)
        assert _as_tuples(out) == expected and stats == total


def test_k_equal_to_vocab_is_pure_student_sampling(pair, prompts, suite_tokenizer):
    student, teacher = pair
    s = SpeculativeSettings(gamma=3, top_k=len(suite_tokenizer), temperature=0.9, max_new_tokens=10)
    out, stats = speculative_generate(student, teacher, suite_tokenizer, prompts, s, seed=SEED, batch_size=4)
    expected = [naive_student_sampling(student, teacher, p, s, i) for i, p in enumerate(prompts)]
    assert _as_tuples(out) == expected
    assert stats.replaced == 0 and stats.acceptance_rate == 1.0 and stats.drafted > 0


def test_k1_greedy_teacher_is_teacher_greedy_decoding(pair, prompts, suite_tokenizer):
    student, teacher = pair
    s = SpeculativeSettings(gamma=4, top_k=1, teacher_temperature=0.0, max_new_tokens=12)
    out, stats = speculative_generate(student, teacher, suite_tokenizer, prompts, s, seed=SEED, batch_size=3)
    vocab = _vocab(student, teacher)
    assert _as_tuples(out) == [naive_greedy(teacher, p, 12, vocab) for p in prompts]
    hf = generate(teacher, suite_tokenizer, prompts, DecodingConfig.greedy(no_repeat_ngram_size=0, max_new_tokens=12),
                  batch_size=3)
    assert _as_tuples(out) == _as_tuples(hf)
    assert stats.replaced > 0


def test_output_independent_of_batch_composition(pair, prompts, suite_tokenizer):
    student, teacher = pair
    s = SETTINGS["top_k"]
    other = list(prompts)
    other[1], other[4] = [7] * 15, [9, 8]  # other neighbours, other length order, same indices for the rest
    out_a, _ = speculative_generate(student, teacher, suite_tokenizer, prompts, s, seed=SEED, batch_size=2)
    for batch_size in (3, 5):
        out_b, _ = speculative_generate(student, teacher, suite_tokenizer, other, s, seed=SEED, batch_size=batch_size)
        for i in (0, 2, 3, 5):
            assert out_b[i] == out_a[i]
    out_c, _ = speculative_generate(student, teacher, suite_tokenizer, prompts, s, seed=SEED + 1, batch_size=2)
    assert _as_tuples(out_c) != _as_tuples(out_a)  # the seed matters


def test_global_rng_untouched_and_training_modes_restored(pair, prompts, suite_tokenizer):
    student, teacher = pair
    student.train()
    try:
        torch.manual_seed(123)
        state = torch.get_rng_state()
        speculative_generate(student, teacher, suite_tokenizer, prompts[:3], SETTINGS["top_p"], seed=SEED, batch_size=2)
        assert torch.equal(torch.get_rng_state(), state)
        assert student.training and all(m.training for m in student.modules())
        assert not teacher.training and not any(m.training for m in teacher.modules())
    finally:
        student.eval()


def test_eos_stops_rows_like_the_reference(pair, prompts, suite_tokenizer):
    student, teacher = pair
    s = SpeculativeSettings(gamma=3, top_k=200, max_new_tokens=16)
    handles = [eos_bias(student, 4.0), eos_bias(teacher, 4.0)]
    try:
        out, stats = speculative_generate(student, teacher, suite_tokenizer, prompts, s, seed=SEED, batch_size=4)
        expected = [naive_skd(student, teacher, p, s, i) for i, p in enumerate(prompts)]
    finally:
        for h in handles:
            h.remove()
    assert _as_tuples(out) == [(tokens, stopped) for tokens, stopped, _ in expected]
    total = SpeculativeStats()
    for *_, row_stats in expected:
        total.add(row_stats)
    assert stats == total  # the student stops drafting at a drafted EOS
    assert any(g.stopped_at_eos and g.token_ids for g in out)  # stopped mid-response
    for g in out:
        assert 0 not in g.token_ids
        assert g.stopped_at_eos or len(g.token_ids) == 16


def test_eos_at_first_token_gives_empty_generation(pair, prompts, suite_tokenizer):
    student, teacher = pair
    handle = eos_bias(student, 100.0)
    try:
        s = SpeculativeSettings(top_k=len(suite_tokenizer), max_new_tokens=8)
        out, stats = speculative_generate(student, teacher, suite_tokenizer, prompts, s, seed=SEED, batch_size=6)
    finally:
        handle.remove()
    assert all(g.token_ids == [] and g.stopped_at_eos and g.text == "" for g in out)
    assert stats.drafted == stats.accepted == stats.blocks == len(prompts)


@pytest.mark.parametrize("gamma", [2, 5])
def test_max_new_tokens_cuts_exactly(pair, prompts, suite_tokenizer, gamma):
    student, teacher = pair
    handles = [eos_bias(student, -1e9), eos_bias(teacher, -1e9)]
    try:
        s = SpeculativeSettings(gamma=gamma, top_k=100, max_new_tokens=3)
        out, stats = speculative_generate(student, teacher, suite_tokenizer, prompts, s, seed=SEED, batch_size=4)
    finally:
        for h in handles:
            h.remove()
    assert all(len(g.token_ids) == 3 and not g.stopped_at_eos for g in out)
    assert stats.accepted + stats.replaced == 3 * len(prompts)


def test_stats():
    assert math.isnan(SpeculativeStats().acceptance_rate)
    a = SpeculativeStats(drafted=4, accepted=3, replaced=1, blocks=1)
    a.add(SpeculativeStats(drafted=2, accepted=1, replaced=1, blocks=1))
    assert a == SpeculativeStats(drafted=6, accepted=4, replaced=2, blocks=2)
    assert a.acceptance_rate == pytest.approx(4 / 6)


def test_k_decay_schedule():
    s = SpeculativeSettings(top_k=25, top_k_end=1, max_new_tokens=5)
    assert [s.k_at(n) for n in range(5)] == [25, 19, 13, 7, 1]
    assert SpeculativeSettings(top_k=3, top_k_end=1, max_new_tokens=1).k_at(0) == 3
    assert SpeculativeSettings(top_k=7).k_at(100) == 7


def test_official_defaults():
    s = SpeculativeSettings()
    assert (s.gamma, s.top_k, s.top_p, s.top_k_end) == (5, 25, 0.0, None)


@pytest.mark.parametrize("field, value", [
    ("gamma", 0), ("gamma", 2.5), ("gamma", True), ("top_k", 0), ("top_p", -0.1), ("top_p", 1.5),
    ("top_k_end", 0), ("temperature", 0.0), ("temperature", math.inf), ("teacher_temperature", -1.0),
    ("max_new_tokens", 0),
])
def test_settings_validation(field, value):
    with pytest.raises(ValueError, match=field):
        SpeculativeSettings(**{field: value})


def test_top_k_end_needs_top_k_acceptance():
    with pytest.raises(ValueError, match="top_k_end"):
        SpeculativeSettings(top_p=0.9, top_k_end=5)


def test_batch_size_validation(pair, prompts, suite_tokenizer):
    student, teacher = pair
    with pytest.raises(ValueError, match="batch_size"):
        speculative_generate(student, teacher, suite_tokenizer, prompts, SpeculativeSettings(), seed=0, batch_size=0)


# ------------------------------------------------------------------------------- KV caches with holes
def test_cached_sampler_matches_recompute_reference_with_many_rejections_and_eos(pair, prompts, suite_tokenizer):
    """Small K: most blocks reject a draft that both models had fed (a hole in both caches); an EOS
    bias stops rows in the middle of the batch, which then leave the caches."""
    student, teacher = pair
    s = SpeculativeSettings(gamma=5, top_k=40, temperature=0.8, teacher_temperature=0.9, max_new_tokens=24)
    prompts = prompts * 2
    handles = [eos_bias(student, 2.5), eos_bias(teacher, 2.5)]
    try:
        expected, total = [], SpeculativeStats()
        for i, p in enumerate(prompts):
            tokens, stopped, stats = naive_skd(student, teacher, p, s, i)
            expected.append((tokens, stopped))
            total.add(stats)
        for batch_size in (1, 5, 12):
            out, stats = speculative_generate(student, teacher, suite_tokenizer, prompts, s, seed=SEED,
                                              batch_size=batch_size)
            assert _as_tuples(out) == expected, batch_size
            assert stats == total
    finally:
        for h in handles:
            h.remove()
    assert total.replaced >= 2 * len(prompts) and total.replaced > total.blocks / 2  # many rejections
    assert total.drafted - total.accepted > total.replaced  # rejected drafts that had been fed: holes
    stops = [len(t) for t, stopped in expected if stopped]
    assert stops and min(stops) < max(len(t) for t, _ in expected)  # rows stop while others go on


def test_each_token_is_fed_once(pair, prompts, suite_tokenizer):
    """No prefix is recomputed: after the prompt each teacher pass feeds at most gamma positions,
    each student pass at most one (gamma - 1 draft steps and the pending token per block)."""
    student, teacher = pair
    s = SETTINGS["top_k"]
    widths = {"student": [], "teacher": []}
    handles = [model.get_input_embeddings().register_forward_hook(
        lambda module, args, out, name=name: widths[name].append(args[0].shape[1]))
        for name, model in (("student", student), ("teacher", teacher))]
    try:
        _, stats = speculative_generate(student, teacher, suite_tokenizer, prompts, s, seed=SEED, batch_size=6)
    finally:
        for h in handles:
            h.remove()
    longest = max(len(p) for p in prompts)
    assert widths["teacher"][0] == longest + s.gamma - 1 and max(widths["teacher"][1:]) <= s.gamma
    assert widths["student"][0] == longest and max(widths["student"][1:]) == 1
    assert len(widths["teacher"]) < stats.blocks  # one teacher pass per block for the whole batch


def test_eager_attention_honours_the_holes(pair, suite_tokenizer):
    """The same samples with eager attention (the default is sdpa). Prompts of equal length: in
    float64, transformers' eager mask turns a query row with no visible key (a left-padded prompt
    position) into NaN, with or without a cache."""
    student, teacher = (copy.deepcopy(m) for m in pair)
    for model in (student, teacher):
        model.set_attn_implementation("eager")
    gen = torch.Generator().manual_seed(8)
    prompts = [torch.randint(2, len(suite_tokenizer), (6,), generator=gen).tolist() for _ in range(4)]
    s = SpeculativeSettings(gamma=4, top_k=60, temperature=0.8, max_new_tokens=14)
    expected, total = [], SpeculativeStats()
    for i, p in enumerate(prompts):
        tokens, stopped, stats = naive_skd(student, teacher, p, s, i)
        expected.append((tokens, stopped))
        total.add(stats)
    assert total.drafted - total.accepted > total.replaced  # holes
    out, stats = speculative_generate(student, teacher, suite_tokenizer, prompts, s, seed=SEED, batch_size=4)
    assert _as_tuples(out) == expected and stats == total


def test_sliding_window_models_are_refused(suite_tokenizer):
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=len(suite_tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2, sliding_window=4, max_position_embeddings=64)
    model = MistralForCausalLM(cfg).eval()
    with pytest.raises(ConfigError, match="sliding-window"):
        speculative_generate(model, model, suite_tokenizer, [[3, 4, 5]], SpeculativeSettings(max_new_tokens=4),
                             seed=0, batch_size=1)


def test_empty_prompt_is_refused(pair, suite_tokenizer):
    with pytest.raises(ConfigError, match="empty prompt"):
        speculative_generate(*pair, suite_tokenizer, [[3, 4], []], SpeculativeSettings(), seed=0, batch_size=2)


# ------------------------------------------------------------------------- the inverse-CDF sampler
def test_sample_rows_matches_the_written_out_draw():
    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(6, 997, generator=g) * 3, -1)
    probs[2, :500] = 0  # a row with many zero-probability tokens
    gens = [torch.Generator().manual_seed(10 + i) for i in range(6)]
    twins = [torch.Generator().manual_seed(10 + i) for i in range(6)]
    for _ in range(20):
        got = sample_rows(probs, gens)
        assert got == [naive_draw(probs[i], twins[i]) for i in range(6)]
        assert all(probs[i, t] > 0 for i, t in enumerate(got))


def test_sample_rows_draws_from_the_distribution():
    """Frequencies of 40 000 draws per row within 5 standard errors of the probabilities (fixed seeds:
    the test is deterministic); a token of probability 0 is never drawn."""
    probs = torch.tensor([[0.5, 0.25, 0.125, 0.0, 0.125], [0.0, 0.0, 0.9, 0.1, 0.0], [0.2] * 5])
    gens = [torch.Generator().manual_seed(s) for s in range(3)]
    counts = torch.zeros(3, 5)
    n = 40_000
    for _ in range(n):
        for i, t in enumerate(sample_rows(probs, gens)):
            counts[i, t] += 1
    freq = counts / n
    se = (probs * (1 - probs) / n).sqrt()
    assert ((freq - probs).abs() <= 5 * se + 1e-12).all(), freq
    assert (counts[probs == 0] == 0).all()


def test_inverse_cdf_edges():
    probs = torch.tensor([[0.0, 0.3, 0.7, 0.0, 0.0], [0.0, 0.3, 0.7, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0]])
    u = torch.tensor([0.0, 1.0 - 2.0 ** -53, 0.5], dtype=torch.float64)
    # u = 0: the first token with probability > 0; u just below 1: the last one, not the zero tail
    assert inverse_cdf(probs, u).tolist() == [1, 2, 2]
    # an unnormalised row is drawn in proportion: the threshold scales with its total
    assert inverse_cdf(torch.tensor([[2.0, 6.0]]), torch.tensor([0.26], dtype=torch.float64)).tolist() == [1]
    assert inverse_cdf(torch.tensor([[2.0, 6.0]]), torch.tensor([0.24], dtype=torch.float64)).tolist() == [0]


def test_sample_rows_uses_one_uniform_per_row_and_checks_its_arguments():
    gens = [torch.Generator().manual_seed(5)]
    sample_rows(torch.full((1, 50), 0.02), gens)
    twin = torch.Generator().manual_seed(5)
    torch.rand(1, generator=twin, dtype=torch.float64)
    assert torch.equal(gens[0].get_state(), twin.get_state())
    assert sample_rows(torch.zeros(0, 5), []) == []
    with pytest.raises(ValueError, match="2 rows but 1 generators"):
        sample_rows(torch.ones(2, 5), gens)
