"""SFT evaluation: the response-only loss by hand and as training logs it, generation from
exactly the prompt ids training scores (both templates, multi-turn), and exact match / BLEU /
ROUGE-L of known predictions against sacrebleu and rouge-score. Uses test_eval.py's run."""

import json

import jax
import ml_collections
import numpy as np
import pytest

from checkpoints.read import load_sampler
from data import sft_batches
from data.hf_tokenizer import load_tokenizer
from data.sft import encode_example, read_jsonl
from evaluation.evaluator import Evaluator
from evaluation.metrics import generation_metrics
from evaluation.run import evaluate_workdir
from evaluation.sft import evaluate_sft
from model.sampler import SamplingConfig
from tests.test_eval import SFT_EXAMPLES, read_records, trained  # noqa: F401 -- the fixture

ONE_DEVICE = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1))
MULTI_TURN = {
    "messages": [
        {"role": "system", "content": "be"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "no"},
        {"role": "assistant", "content": "ok"},
    ]
}
# A chat template that writes the bos text itself, for a tokenizer that also adds bos.
BOS_CHAT = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}<|e|>"
    "{% endfor %}{% if add_generation_prompt %}a:{% endif %}"
)


def test_sft_evaluation_scores_responses_only_and_matches_training(trained):
    """Response loss by hand (only assistant tokens count), and the same numbers as the
    evaluation inside training."""
    workdir, files = trained
    report = evaluate_workdir(workdir, sft_file=files["sft"], max_new_tokens=6)
    ours = report["results"][f"sft:{files['sft']}"]

    sampler, run = load_sampler(workdir, ONE_DEVICE, devices=jax.devices()[:1])
    tokenizer = load_tokenizer(run.config.data.tokenizer)
    examples = read_jsonl(files["sft"])[0]
    loss, count = response_loss(sampler.model, sampler.params, tokenizer, examples)
    assert 0 < count == ours["tokens"]
    np.testing.assert_allclose(ours["loss"], loss, rtol=1e-5)

    # The generation metrics are 0 here (the run's params generate spaces): they are checked
    # against independent values in test_sft_evaluation_uses_the_params_it_is_given_...
    assert len(ours["predictions"]) == ours["examples"] == 3
    logged = read_records(workdir)[-1]
    for name in ("loss", "bits_per_byte", "exact_match", "bleu", "rouge_l"):
        np.testing.assert_allclose(ours[name], logged[f"sft_{name}"], rtol=1e-5)


def response_loss(model, params, tokenizer, examples) -> tuple[float, float]:
    """(mean loss on the plain template's response tokens, their number), by full forward passes."""
    nats, count = 0.0, 0.0
    for example in examples:
        ids, mask = encode_example(tokenizer, example, "plain")
        logits = model.apply({"params": params}, ids[None, :-1])[0]
        logprobs = np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float64)))
        nats -= float((mask[1:] * logprobs[np.arange(len(ids) - 1), ids[1:]]).sum())
        count += mask[1:].sum()
    return nats / count, count


def training_prompts(path, data_config, tokenizer) -> list[list[int]]:
    """Each example's ids in SFT training's batches (data/sft_batches.py) before the first
    token of its last response (where the response mask last turns on)."""
    examples = sft_batches.Examples(path, data_config, tokenizer, data_config.seq_len + 1)
    prompts = []
    for ids, mask in zip(examples.ids, examples.masks):
        start = max(i for i in range(1, len(mask)) if mask[i] and not mask[i - 1])
        prompts.append(ids[:start].tolist())
    return prompts


def greedy(model, params, prompt, max_new_tokens, eos_id, num_ids) -> list[int]:
    """Greedy tokens after `prompt` by full forward passes (no KV cache, no Sampler), each
    on the ids padded to max_seq_len (causal: the padding after them changes nothing)."""
    forward = jax.jit(lambda x: model.apply({"params": params}, x))
    ids = list(prompt)
    for _ in range(max_new_tokens):
        padded = np.pad(ids, (0, model.config.max_seq_len - len(ids)))[None]
        ids.append(int(np.asarray(forward(padded))[0, len(ids) - 1, :num_ids].argmax()))
        if ids[-1] == eos_id:
            break
    return ids[len(prompt) :]


def write_jsonl(path, examples) -> str:
    path.write_text("".join(json.dumps(example) + "\n" for example in examples))
    return str(path)


def bos_tokenizer(root) -> str:
    """A character tokenizer.json (the plain template's role names one token each) that adds
    bos to every text, with BOS_CHAT beside it."""
    import tokenizers
    from tokenizers import models, processors

    specials = ["<s>", "</s>", "<|e|>"]
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz :?\n"))
    vocab = {c: i for i, c in enumerate(["<unk>", *specials, *chars])}
    tokenizer = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.add_special_tokens(specials)
    tokenizer.add_tokens(["System: ", "User: ", "Assistant: "])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer.save(str(root / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": BOS_CHAT}
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    return str(root / "tokenizer.json")


@pytest.mark.parametrize("template", ["plain", "hf"])
def test_sft_generation_starts_from_the_training_prompt_ids(trained, tmp_path, template):
    """The ids generation starts from are those SFT training's batches hold before the last
    response: with hf, one bos although the template writes it and the tokenizer adds it;
    with plain, a multi-turn example's earlier response keeps its eos."""
    path = write_jsonl(tmp_path / "sft.jsonl", [SFT_EXAMPLES[1], MULTI_TURN])
    tokenizer = load_tokenizer(bos_tokenizer(tmp_path))
    data = ml_collections.ConfigDict(
        dict(sft_template=template, tokenizer=tokenizer.path, seq_len=32, skip_bad_lines=False)
    )
    sampler, _ = load_sampler(trained[0], ONE_DEVICE, devices=jax.devices()[:1])
    generated, generate = [], sampler.generate
    sampler.generate = lambda prompts, *args, **kw: generated.extend(prompts) or generate(
        prompts, *args, **kw
    )
    sampling = SamplingConfig(max_new_tokens=2, temperature=0.0)
    evaluate_sft(Evaluator(sampler, tokenizer, 4), read_jsonl(path)[0], data, sampling)

    expected = training_prompts(path, data, tokenizer)
    assert [list(ids) for ids in generated] == expected
    bos, eos, end_of_turn = tokenizer.bos_id, tokenizer.eos_id, tokenizer.encode("<|e|>")[-1]
    assert [ids.count(bos) for ids in expected] == [1, 1]
    if template == "plain":  # the earlier response's eos
        assert expected[1].count(eos) == 1
    else:  # each of the four earlier turns' end-of-turn text
        assert expected[1].count(end_of_turn) == 4


def test_sft_evaluation_uses_the_params_it_is_given_with_known_metrics(trained, tmp_path):
    """Other params than the sampler's: their response loss and greedy responses (computed
    here by full forward passes); then references set to two of those responses, so exact
    match, BLEU and ROUGE-L are known and not zero."""
    workdir, files = trained
    sampler, run = load_sampler(workdir, ONE_DEVICE, devices=jax.devices()[:1])
    data, tokenizer = run.config.data, load_tokenizer(run.config.data.tokenizer)
    params = jax.tree.map(lambda p: -p, sampler.params)  # words, where the run's give spaces
    evaluator = Evaluator(sampler, tokenizer, 4)
    sampling = SamplingConfig(max_new_tokens=16, temperature=0.0)
    examples = read_jsonl(files["sft"])[0]
    metrics, predictions = evaluate_sft(evaluator, examples, data, sampling, params)

    loss, _ = response_loss(sampler.model, params, tokenizer, examples)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
    expected = []
    for prompt in training_prompts(files["sft"], data, tokenizer):
        new = greedy(sampler.model, params, prompt, 16, tokenizer.eos_id, tokenizer.vocab_size)
        expected.append(tokenizer.decode([t for t in new if t != tokenizer.eos_id]))
    assert predictions == expected
    assert evaluate_sft(evaluator, examples, data, sampling)[1] != predictions  # params matter

    references = [*predictions[:2], "no such answer"]
    for example, reference in zip(examples, references):
        example["messages"][-1]["content"] = reference
    metrics, again = evaluate_sft(evaluator, examples, data, sampling, params)
    assert again == predictions and metrics["exact_match"] == pytest.approx(2 / 3)
    import sacrebleu
    from rouge_score import rouge_scorer

    bleu = sacrebleu.corpus_bleu(predictions, [references]).score
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    scores = [scorer.score(r, p)["rougeL"].fmeasure for r, p in zip(references, predictions)]
    rouge = np.mean(scores)
    assert metrics["bleu"] == pytest.approx(bleu) and bleu > 0
    assert metrics["rouge_l"] == pytest.approx(rouge) and rouge > 0


def test_generation_metrics_on_known_cases():
    perfect = generation_metrics(
        ["the cat sat on the mat", " 42 "], ["the cat sat on the mat", "42"]
    )
    assert perfect["exact_match"] == 1.0 and perfect["rouge_l"] == pytest.approx(1.0)
    assert perfect["bleu"] == pytest.approx(100.0)
    wrong = generation_metrics(["dogs bark loudly"], ["the cat sat on the mat"])
    assert (wrong["exact_match"], wrong["bleu"], wrong["rouge_l"]) == (0.0, 0.0, 0.0)
    half = generation_metrics(["the cat ran", "x"], ["the cat sat", "x"])
    assert half["exact_match"] == 0.5
    assert half["rouge_l"] == pytest.approx((2 / 3 + 1) / 2)  # LCS 2 of 3 words, and 1
