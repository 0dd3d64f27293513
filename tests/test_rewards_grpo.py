"""Every reward function through a real TRL GRPOTrainer step on a tiny text-only model (offline, CPU)."""

from __future__ import annotations

import functools

import pytest

pytest.importorskip("trl")

from training.rewards import (  # noqa: E402
    DEFAULT_REWARD_WEIGHTS,
    encode_gold_labels,
    encode_gold_steps,
    format_reward,
    outcome_reward,
    process_reward,
    process_reward_gated,
)

STEPS = [
    {"kind": "observation", "text": "There is no pleural effusion.",
     "findings": [{"observation": "Pleural Effusion", "status": "absent", "anatomy": None}]},
    {"kind": "conclusion", "text": "Therefore, the answer is B.", "findings": []},
]
COLUMNS = ("solution", "task", "gold_steps", "gold_labels")


@pytest.fixture(scope="module")
def tiny_model_and_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    corpus = [
        "<think>There is no pleural effusion.\nTherefore, the answer is B.</think><answer>B</answer>",
        "Does this chest X-ray show Pleural Effusion? Options: A) Yes B) No",
        "Which findings are in this chest X-ray? Cardiomegaly, Edema",
    ] * 10
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>")
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    config = Qwen2Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return Qwen2ForCausalLM(config), tok


def _dataset(conversational: bool):
    from datasets import Dataset

    gold_steps, gold_labels = encode_gold_steps(STEPS), encode_gold_labels({"Pleural Effusion": "negative"})
    rows = []
    for i in range(4):
        question = "Does this chest X-ray show Pleural Effusion? Options: A) Yes B) No" if i % 2 == 0 else \
            "Which findings are in this chest X-ray?"
        rows.append(dict(
            prompt=[{"role": "user", "content": question}] if conversational else question,
            solution="B" if i % 2 == 0 else "Cardiomegaly, Edema",
            task="binary" if i % 2 == 0 else "open",
            gold_steps=gold_steps,
            gold_labels=gold_labels,
        ))
    return Dataset.from_list(rows)


def _spy(fn, calls):
    @functools.wraps(fn)  # keeps __name__: TRL names the logged reward after it
    def wrapper(completions, **kwargs):
        out = fn(completions, **kwargs)
        calls.append((fn.__name__, completions, {k: kwargs.get(k) for k in COLUMNS}, out))
        return out

    return wrapper


@pytest.mark.parametrize("conversational", [True, False])
def test_grpo_step_calls_every_reward_with_the_dataset_columns(tiny_model_and_tokenizer, tmp_path, conversational):
    from trl import GRPOConfig, GRPOTrainer

    model, tok = tiny_model_and_tokenizer
    funcs = [outcome_reward, format_reward, process_reward, process_reward_gated]
    calls: list = []
    args = GRPOConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", num_generations=2,
        per_device_train_batch_size=2, max_completion_length=12, max_steps=1, logging_steps=1,
        save_strategy="no", reward_weights=[*DEFAULT_REWARD_WEIGHTS, 1.0], seed=0,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=[_spy(f, calls) for f in funcs], args=args,
                          train_dataset=_dataset(conversational), processing_class=tok)
    trainer.train()

    assert trainer.state.global_step == 1
    assert sorted({c[0] for c in calls}) == sorted(f.__name__ for f in funcs)
    by_name = {f.__name__: f for f in funcs}
    for name, completions, cols, out in calls:
        assert len(out) == len(completions) == 2
        assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in out)
        assert all(cols[k] is not None and len(cols[k]) == 2 for k in COLUMNS), name
        assert isinstance(completions[0], list if conversational else str)
        assert cols["task"][0] in ("binary", "open")
        # the reward TRL got is the one the function gives on the same inputs
        assert by_name[name](completions, **cols) == out
    logged = trainer.state.log_history[0]
    for f in funcs:
        assert f"rewards/{f.__name__}/mean" in logged


def test_rewards_score_a_known_good_rollout_in_trl_shape():
    # What TRL passes for one prompt with two rollouts: a good one and a malformed one.
    good = "<think>There is no pleural effusion.\nTherefore, the answer is B.</think><answer>B</answer>"
    completions = [[{"role": "assistant", "content": good}], [{"role": "assistant", "content": "B"}]]
    kwargs = dict(prompts=[[{"role": "user", "content": "Q"}]] * 2, completion_ids=[[1], [2]],
                  solution=["B", "B"], task=["binary", "binary"],
                  gold_steps=[encode_gold_steps(STEPS)] * 2,
                  gold_labels=[encode_gold_labels({"Pleural Effusion": "negative"})] * 2,
                  trainer_state=None, log_extra=None, log_metric=None)
    assert format_reward(completions, **kwargs) == [1.0, 0.0]
    # A bare "B" is read as an answer (free-text outputs are scored, issue 13); it has no
    # reasoning, so the process reward (and the gated one) pays nothing and the format reward 0.
    assert outcome_reward(completions, **kwargs) == [1.0, 1.0]
    assert process_reward(completions, **kwargs) == [1.0, 0.0]
    assert process_reward_gated(completions, **kwargs) == [1.0, 0.0]
